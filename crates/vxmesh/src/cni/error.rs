//! The plugin's errors: a spec error code, a message and details, printed
//! as the CNI error JSON on stdout.

use serde_json::{Value, json};

/// CNI error codes (spec section "Error"); the number is what the plugin prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// 1: the configuration's cniVersion is not one the plugin speaks.
    IncompatibleVersion,
    /// 2: a field (or CNI_ARGS key) the plugin does not understand.
    UnsupportedField,
    /// 3: the container (its network namespace) does not exist.
    UnknownContainer,
    /// 4: a CNI_* environment variable is missing or wrong.
    InvalidEnv,
    /// 5: an I/O failure (netlink, files, etcd).
    IoFailure,
    /// 6: stdin (or prevResult) could not be decoded.
    DecodeFailure,
    /// 7: the network configuration is invalid.
    InvalidConfig,
    /// 11: a transient failure; the runtime may retry.
    TryAgainLater,
    /// 50: the plugin is not available (STATUS).
    NotAvailable,
}

impl Code {
    /// The code's number in the spec.
    pub fn number(self) -> u32 {
        match self {
            Code::IncompatibleVersion => 1,
            Code::UnsupportedField => 2,
            Code::UnknownContainer => 3,
            Code::InvalidEnv => 4,
            Code::IoFailure => 5,
            Code::DecodeFailure => 6,
            Code::InvalidConfig => 7,
            Code::TryAgainLater => 11,
            Code::NotAvailable => 50,
        }
    }
}

/// One failed invocation: what the runtime reads from the error JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {}: {msg}", code.number())]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// An I/O failure (code 5) of `what`; the details are the cause's chain.
    pub fn io(what: &str, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        CniError::new(Code::IoFailure, what, chain(&*cause.into()))
    }

    /// The error JSON the plugin prints, in the reply's `version`.
    pub fn to_json(&self, version: &str) -> Value {
        json!({ "cniVersion": version, "code": self.code.number(), "msg": self.msg, "details": self.details })
    }
}

pub use crate::error::chain;

pub type CniResult<T> = Result<T, CniError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_spec_numbers() {
        let all = [
            (Code::IncompatibleVersion, 1),
            (Code::UnsupportedField, 2),
            (Code::UnknownContainer, 3),
            (Code::InvalidEnv, 4),
            (Code::IoFailure, 5),
            (Code::DecodeFailure, 6),
            (Code::InvalidConfig, 7),
            (Code::TryAgainLater, 11),
            (Code::NotAvailable, 50),
        ];
        for (c, n) in all {
            assert_eq!(c.number(), n);
        }
    }

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = CniError::new(Code::InvalidEnv, "CNI_NETNS is not set", "set it");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion":"1.0.0","code":4,"msg":"CNI_NETNS is not set","details":"set it"})
        );
    }

    #[test]
    fn io_details_are_the_whole_cause_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = CniError::io("attach failed", Outer(std::io::Error::other("inner")));
        assert_eq!(e.code, Code::IoFailure);
        assert_eq!(e.msg, "attach failed");
        assert_eq!(e.details, "outer: inner");
    }

    #[test]
    fn io_details_of_an_anyhow_error_are_its_alternate_display() {
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        let want = format!("{e:#}");
        assert_eq!(CniError::io("x", e).details, want);
    }
}
