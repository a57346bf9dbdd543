//! Names as the zone holds them: absolute, lowercase, with a trailing dot,
//! made only of hostname labels (RFC 1123 §2.1: letters, digits and
//! hyphens, not starting or ending with a hyphen).

use super::{MAX_LABEL_LEN, MAX_NAME_LEN};

/// Why a name is not one the zone can hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error(
        "label {label:?} is not 1 to {MAX_LABEL_LEN} of a-z, 0-9 and '-', not starting or ending with '-'"
    )]
    BadLabel { label: String },
    #[error("the name is {len} characters; at most {MAX_NAME_LEN} are allowed")]
    TooLong { len: usize },
    #[error("{name:?} is not inside the zone {apex:?}")]
    OutsideZone { name: String, apex: String },
    #[error("{apex:?} is the zone's apex; its records are the server's")]
    Apex { apex: String },
}

/// Check the labels of `name` (no trailing dot) and its length.
fn check_labels(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    for label in name.split('.') {
        let ok = (1..=MAX_LABEL_LEN).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(NameError::BadLabel {
                label: label.to_owned(),
            });
        }
    }
    Ok(())
}

/// An apex as configured: absolute (trailing dot), lowercase, valid labels.
pub fn check_apex(apex: &str) -> Result<(), NameError> {
    let Some(bare) = apex.strip_suffix('.') else {
        return Err(NameError::BadLabel {
            label: format!("{apex} (an apex must end with '.')"),
        });
    };
    check_labels(bare)
}

/// A name relative to the apex (no trailing dot), lowercase, valid labels.
pub fn check_relative(name: &str) -> Result<(), NameError> {
    check_labels(name)
}

/// The absolute form of `input` inside the zone `apex` (absolute, checked
/// with [`check_apex`]). `input` is ASCII case-insensitive and is read as:
/// - absolute when it ends with `.`;
/// - absolute too when it ends with the apex without its dot
///   (`node2.internet2.test`);
/// - otherwise relative to the apex (`node2`).
///
/// The result must be strictly inside the zone (not the apex itself).
pub fn qualify(apex: &str, input: &str) -> Result<String, NameError> {
    if input.is_empty() {
        return Err(NameError::Empty);
    }
    let lower = input.to_ascii_lowercase();
    let bare_apex = apex.strip_suffix('.').unwrap_or(apex);
    let absolute = if lower.ends_with('.') {
        lower
    } else if lower == bare_apex || lower.ends_with(&format!(".{bare_apex}")) {
        format!("{lower}.")
    } else {
        format!("{lower}.{apex}")
    };
    let bare = &absolute[..absolute.len() - 1];
    check_labels(bare)?;
    if absolute == apex {
        return Err(NameError::Apex {
            apex: apex.to_owned(),
        });
    }
    if !absolute.ends_with(&format!(".{apex}")) {
        return Err(NameError::OutsideZone {
            name: absolute,
            apex: apex.to_owned(),
        });
    }
    Ok(absolute)
}
