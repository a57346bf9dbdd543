//! The certificate authority. Until the full authority lands, a development
//! CA (`dev_ca`) makes the server's certificate on first start.

pub mod ca;
pub mod ct;
pub mod dev_ca;
