//! Errors rendered for people: an error and its causes on one line, the way
//! log lines and the CNI error's details show them.

/// An error and its causes, outermost first, joined with ": " (what
/// `anyhow`'s `{:#}` prints).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_every_cause_outermost_first() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Middle);
        #[derive(Debug, thiserror::Error)]
        #[error("middle")]
        struct Middle(#[source] std::io::Error);
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(chain(&e), "outer: middle: inner");
    }
}
