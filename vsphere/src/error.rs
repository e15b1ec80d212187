//! What can go wrong talking to vCenter, and how vim_rs' errors map onto it.

use std::time::Duration;

use vim_rs::core::client::Error as VimError;
use vim_rs::types::struct_enum::StructType;
use vim_rs::types::structs::MethodFault;

use super::tls::Rejections;

#[derive(thiserror::Error, Debug)]
pub enum VSphereError {
    /// The certificate did not match the pinned thumbprint or CA; says which, and what the
    /// server presented (its SHA-256 thumbprint).
    #[error("vCenter TLS: {0}")]
    Tls(String),
    /// The credentials were rejected.
    #[error("vCenter login failed: {0}")]
    Login(String),
    #[error("{what} did not complete within {after:?}")]
    Timeout { what: String, after: Duration },
    /// A VM, datacenter or snapshot does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// vCenter no longer accepts this changeId for the disk (CBT reset, disk resized, VM
    /// recreated): copy the whole disk.
    #[error("changeId {change_id:?} of disk {device_key} is not valid any more: {message}")]
    InvalidChangeId {
        device_key: i32,
        change_id: String,
        message: String,
    },
    /// Any other fault vCenter answered with; `fault` is its type name (`FileFault`, ...).
    #[error("{method} failed with {fault}: {message}")]
    Fault {
        method: String,
        fault: String,
        message: String,
    },
    /// A vSphere task ended in error.
    #[error("{what} failed: {message}")]
    Task { what: String, message: String },
    /// The connection failed or the answer could not be understood.
    #[error("vCenter transport: {0}")]
    Transport(String),
}

impl VSphereError {
    /// A short, stable label for metrics and condition reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            VSphereError::Tls(_) => "TLSVerificationFailed",
            VSphereError::Login(_) => "LoginFailed",
            VSphereError::Timeout { .. } => "Timeout",
            VSphereError::NotFound(_) => "NotFound",
            VSphereError::InvalidChangeId { .. } => "InvalidChangeId",
            VSphereError::Fault { .. } => "Fault",
            VSphereError::Task { .. } => "TaskFailed",
            VSphereError::Transport(_) => "TransportError",
        }
    }

    /// The fault type name when vCenter answered with a fault.
    pub fn fault_type(&self) -> Option<&str> {
        match self {
            VSphereError::Fault { fault, .. } => Some(fault),
            _ => None,
        }
    }
}

/// The session is gone (expired or terminated): log in again and retry once.
pub(crate) fn is_not_authenticated(err: &VimError) -> bool {
    matches!(err, VimError::MethodFault(f) if f.type_ == Some(StructType::NotAuthenticated))
}

/// A NotAuthenticated fault made up locally, for answers that show the session is gone without
/// the server saying so.
pub(crate) fn not_authenticated() -> VimError {
    VimError::MethodFault(std::sync::Arc::new(MethodFault {
        fault_cause: None,
        fault_message: None,
        type_: Some(StructType::NotAuthenticated),
        extra_fields_: Default::default(),
    }))
}

pub(crate) fn is_invalid_login(err: &VimError) -> bool {
    matches!(err, VimError::MethodFault(f) if f.type_ == Some(StructType::InvalidLogin))
}

/// The fault of `err` when it is one: (type name, the fault itself).
pub(crate) fn fault_of(err: &VimError) -> Option<(&'static str, &MethodFault)> {
    match err {
        VimError::MethodFault(f) => Some((fault_name(f), f)),
        _ => None,
    }
}

pub(crate) fn fault_name(f: &MethodFault) -> &'static str {
    f.type_.map(|t| t.as_str()).unwrap_or("MethodFault")
}

/// A fault's string field (e.g. `invalidProperty` of `InvalidArgument`).
pub(crate) fn fault_field<'f>(f: &'f MethodFault, name: &str) -> Option<&'f str> {
    match f.extra_fields_.get(name) {
        Some(miniserde::json::Value::String(s)) => Some(s),
        _ => None,
    }
}

/// A readable account of a fault: its messages and its type-specific fields.
pub(crate) fn describe_fault(f: &MethodFault) -> String {
    let mut parts: Vec<String> = f
        .fault_message
        .iter()
        .flatten()
        .filter_map(|m| m.message.clone().or_else(|| Some(m.key.clone())))
        .filter(|m| !m.is_empty())
        .collect();
    let mut fields: Vec<_> = f.extra_fields_.iter().collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    for (name, value) in fields {
        let value = match value {
            miniserde::json::Value::String(s) => s.clone(),
            other => miniserde::json::to_string(other),
        };
        parts.push(format!("{name}={value}"));
    }
    if let Some(cause) = &f.fault_cause {
        parts.push(format!(
            "caused by {}: {}",
            fault_name(cause),
            describe_fault(cause)
        ));
    }
    if parts.is_empty() {
        fault_name(f).to_string()
    } else {
        parts.join("; ")
    }
}

/// Maps a vim_rs error of `method` (the SOAP method name) onto ours.
pub(crate) fn from_vim(method: &str, err: VimError, rejections: &Rejections) -> VSphereError {
    match err {
        VimError::MethodFault(f) => {
            let fault = fault_name(&f);
            let message = describe_fault(&f);
            match f.type_ {
                Some(StructType::InvalidLogin) => VSphereError::Login(format!(
                    "vCenter rejected the user name or password ({method}: {message})"
                )),
                Some(StructType::ManagedObjectNotFound) => {
                    VSphereError::NotFound(format!("{method}: {message}"))
                }
                _ => VSphereError::Fault {
                    method: method.to_string(),
                    fault: fault.to_string(),
                    message,
                },
            }
        }
        VimError::ReqwestError(e) => {
            if let Some(why) = rejections.take() {
                return VSphereError::Tls(why);
            }
            let mut chain = format!("{method}: {e}");
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                chain.push_str(": ");
                chain.push_str(&s.to_string());
                source = s.source();
            }
            VSphereError::Transport(chain)
        }
        VimError::ParseError(s) => {
            VSphereError::Transport(format!("{method}: unexpected answer: {s}"))
        }
        other => VSphereError::Transport(format!("{method}: {other}")),
    }
}
