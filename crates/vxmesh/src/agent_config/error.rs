//! What is wrong with an agent configuration: every problem, each naming
//! its key (or flag) as written and the fix.

use std::fmt;

use crate::config::Problem;

/// Every problem of an agent configuration (validation does not stop at
/// the first).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct AgentConfigError {
    /// The file, the file and the command line, or the command line.
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for AgentConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid agent configuration ({}):", self.source_name)?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl AgentConfigError {
    pub(super) fn one(source: &str, field: &str, message: String) -> Self {
        AgentConfigError {
            source_name: source.to_string(),
            problems: vec![Problem {
                field: field.to_string(),
                message,
            }],
        }
    }
}
