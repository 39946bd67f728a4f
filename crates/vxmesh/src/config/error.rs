//! What is wrong with a cluster file: every problem, each naming its field
//! and the fix.

use std::fmt;

/// One problem found in a cluster file: where, what, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem in a cluster file (validation does not stop at the first).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid cluster file {}:", self.source_name)?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub(super) fn one(source: &str, field: &str, message: String) -> Self {
        ConfigError {
            source_name: source.to_string(),
            problems: vec![Problem {
                field: field.to_string(),
                message,
            }],
        }
    }
}
