//! Session names that a client may ask for.

/// Why a requested session name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionNameError {
    /// Shorter than 3 or longer than 63 characters.
    #[error("session name must be 3 to 63 characters long, got {0}")]
    Length(usize),
    /// Contains something other than `a-z`, `0-9` or `-`.
    #[error("session name may contain only lowercase letters, digits and dashes (found {0:?})")]
    Character(char),
}

/// Checks a requested session name: lowercase ASCII letters, digits and dashes, 3 to 63 long.
pub fn validate_session_name(name: &str) -> Result<(), SessionNameError> {
    let len = name.chars().count();
    if !(3..=63).contains(&len) {
        return Err(SessionNameError::Length(len));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        Some(bad) => Err(SessionNameError::Character(bad)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in ["abc", "stripe-dev", "a1-b2", &"x".repeat(63)] {
            assert_eq!(validate_session_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn rejects_invalid_names() {
        assert_eq!(
            validate_session_name("ab"),
            Err(SessionNameError::Length(2))
        );
        assert_eq!(
            validate_session_name(&"x".repeat(64)),
            Err(SessionNameError::Length(64))
        );
        assert_eq!(
            validate_session_name("Stripe"),
            Err(SessionNameError::Character('S'))
        );
        assert_eq!(
            validate_session_name("a_b"),
            Err(SessionNameError::Character('_'))
        );
        assert_eq!(
            validate_session_name("a/b"),
            Err(SessionNameError::Character('/'))
        );
        assert_eq!(
            validate_session_name("ééé"),
            Err(SessionNameError::Character('é'))
        );
    }
}
