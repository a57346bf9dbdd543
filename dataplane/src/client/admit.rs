//! The client side of admission: once the handshake completes, fetch the
//! connection's parameters, register the plot if the server lacks it, make
//! and submit the bundle, and only then let the caller's requests go.
//! The proofs come from the [`Admitter`] the caller gave its target.

use crate::admission::{
    Admitter, KIND_ADMISSION_PARAMS, KIND_ADMISSION_SUBMIT, KIND_PLOT_REGISTER,
};
use crate::protocols::stoq::{self, ErrorCode, KIND_ERROR, RESPONSE_PAYLOAD_MAX};
use crate::protocols::{ReadState, read_stream};
use quinn_proto::{Connection, Dir, StreamId};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the exchange stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for the server.
    Pending,
    /// The bundle is on its way: requests sent now are held by the server
    /// and answered once it verifies (up to `HELD_BYTES_MAX` of them).
    Submitted,
    /// Admitted (or the server does not ask for admission): send requests.
    Admitted,
    /// Admission failed; the reason, for the user.
    Failed(String),
}

#[derive(Debug)]
enum Step {
    Params,
    Register,
    Submit,
    Done,
}

/// One connection's admission exchange.
pub struct ClientAdmission {
    admitter: Arc<dyn Admitter>,
    step: Step,
    stream: Option<StreamId>,
    buf: Vec<u8>,
    params: Vec<u8>,
    started: Option<Instant>,
    /// From sending the parameters request to the admitted answer.
    pub elapsed: Option<Duration>,
}

impl ClientAdmission {
    fn new(admitter: Arc<dyn Admitter>) -> Self {
        Self {
            admitter,
            step: Step::Params,
            stream: None,
            buf: Vec::new(),
            params: Vec::new(),
            started: None,
            elapsed: None,
        }
    }

    /// The handshake completed: ask for the parameters.
    pub fn start(admitter: Arc<dyn Admitter>, conn: &mut Connection) -> (Self, Progress) {
        let mut admission = Self::new(admitter);
        admission.started = Some(Instant::now());
        let progress = admission.send(conn, KIND_ADMISSION_PARAMS, &[]);
        (admission, progress)
    }

    /// Stream `id` is readable: the exchange's progress when it is the
    /// exchange's stream, `None` when it belongs to the caller.
    pub fn on_stream(
        admission: &mut Option<Self>,
        conn: &mut Connection,
        id: StreamId,
    ) -> Option<Progress> {
        let admission = admission.as_mut().filter(|a| a.stream == Some(id))?;
        Some(admission.on_readable(conn, id))
    }

    /// The stream of the request in flight.
    pub fn stream(&self) -> Option<StreamId> {
        self.stream
    }

    pub fn is_done(&self) -> bool {
        matches!(self.step, Step::Done)
    }

    fn send(&mut self, conn: &mut Connection, kind: u8, payload: &[u8]) -> Progress {
        let Some(id) = conn.streams().open(Dir::Bi) else {
            return Progress::Failed("the server allows no stream for admission".into());
        };
        let mut send = conn.send_stream(id);
        let _ = send.write_chunks(&mut [stoq::encode(kind, payload)]);
        let _ = send.finish();
        self.stream = Some(id);
        self.buf.clear();
        Progress::Pending
    }

    /// Data on the admission stream.
    pub fn on_readable(&mut self, conn: &mut Connection, id: StreamId) -> Progress {
        let limit = stoq::HEADER_LEN + RESPONSE_PAYLOAD_MAX;
        match read_stream(conn, id, &mut self.buf, limit) {
            ReadState::Open if self.buf.len() <= limit => return Progress::Pending,
            ReadState::Reset => {
                return Progress::Failed("the server reset the admission stream".into());
            }
            _ => {}
        }
        self.stream = None;
        let message = match stoq::decode(&self.buf, RESPONSE_PAYLOAD_MAX) {
            Ok(message) => message,
            Err(e) => return Progress::Failed(format!("malformed admission answer: {e}")),
        };
        if message.kind == KIND_ERROR {
            let (code, text) = stoq::decode_error_payload(&message.payload);
            if matches!(self.step, Step::Params) && code == ErrorCode::AdmissionOff as u16 {
                self.step = Step::Done;
                return Progress::Admitted;
            }
            return Progress::Failed(format!("admission refused ({code:#x}): {text}"));
        }
        match self.step {
            Step::Params => {
                self.params = message.payload.to_vec();
                match self.admitter.registration(&self.params) {
                    Ok(Some(registration)) => {
                        self.step = Step::Register;
                        self.send(conn, KIND_PLOT_REGISTER, &registration)
                    }
                    Ok(None) => self.submit(conn),
                    Err(e) => Progress::Failed(e),
                }
            }
            Step::Register => self.submit(conn),
            Step::Submit => {
                self.step = Step::Done;
                self.elapsed = self.started.map(|s| s.elapsed());
                Progress::Admitted
            }
            Step::Done => Progress::Admitted,
        }
    }

    fn submit(&mut self, conn: &mut Connection) -> Progress {
        let Some(binding) = crate::admission::binding_of(conn) else {
            return Progress::Failed("no TLS exporter on this connection".into());
        };
        match self.admitter.bundle(&self.params, &binding) {
            Ok(bundle) => {
                self.step = Step::Submit;
                match self.send(conn, KIND_ADMISSION_SUBMIT, &bundle) {
                    Progress::Pending => Progress::Submitted,
                    other => other,
                }
            }
            Err(e) => Progress::Failed(e),
        }
    }
}
