//! Phone numbers for "link with phone number" (a pairing code instead of a QR). Pure logic, no
//! pgrx.
//!
//! The Evolution API wants digits only, with the country code (`5511987654321`): an E.164
//! number without its `+`. What people type is normalised only where nothing can be lost: a
//! leading `+` and the spaces, hyphens, dots and parentheses of formatting. Anything else is
//! refused with the reason, never guessed at: a leading `0` is a national trunk prefix or an
//! international `00`, and which country it means is not known here.

/// Why a phone number was refused; the message names the rule and never echoes the number
/// (it is personal data, and error messages reach logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhoneError {
    Empty,
    /// A character that is neither a digit nor formatting (a letter, `*`, `#`, a second `+`).
    BadCharacter,
    /// Starts with 0: a trunk prefix or `00`, not a country code.
    LeadingZero,
    /// Fewer than 8 or more than 15 digits (E.164 allows at most 15).
    Length(usize),
}

impl std::fmt::Display for PhoneError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PhoneError::Empty => write!(f, "the phone number is empty"),
            PhoneError::BadCharacter => write!(
                f,
                "the phone number may hold only digits, one leading +, spaces, hyphens, dots and parentheses"
            ),
            PhoneError::LeadingZero => write!(
                f,
                "the phone number starts with 0: write it with its country code, without 00 or a trunk 0 (e.g. +1 415 555 0100)"
            ),
            PhoneError::Length(n) => write!(
                f,
                "the phone number has {n} digits; with its country code it must have 8 to 15"
            ),
        }
    }
}

/// A normalised phone number (digits, country code first). Its `Debug` never shows the digits:
/// rows that carry one may end up in a debug print, and the number must never reach a log.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Phone(String);

impl Phone {
    pub fn parse(input: &str) -> Result<Phone, PhoneError> {
        normalize(input).map(Phone)
    }

    /// The digits, for the one place they are meant for: the request to the server.
    pub fn digits(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Phone {
    type Error = PhoneError;
    fn try_from(s: String) -> Result<Phone, PhoneError> {
        Phone::parse(&s)
    }
}

impl std::fmt::Debug for Phone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Phone([{} digits])", self.0.len())
    }
}

/// The number as the Evolution API takes it (digits only, country code first), or why not.
pub fn normalize(input: &str) -> Result<String, PhoneError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(PhoneError::Empty);
    }
    let rest = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let mut digits = String::with_capacity(rest.len());
    for c in rest.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return Err(PhoneError::BadCharacter),
        }
    }
    if digits.is_empty() {
        return Err(PhoneError::Empty);
    }
    if digits.starts_with('0') {
        return Err(PhoneError::LeadingZero);
    }
    if !(8..=15).contains(&digits.len()) {
        return Err(PhoneError::Length(digits.len()));
    }
    Ok(digits)
}

/// `text` with every run of 8 or more digits (a phone number, possibly) replaced by `[number]`,
/// for messages that quote what a server said: an error text may echo the number it was sent.
pub fn redact_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 8 {
            out.push_str("[number]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_is_dropped_and_the_digits_kept() {
        for typed in [
            "5511987654321",
            "+5511987654321",
            " +55 11 98765-4321 ",
            "+55 (11) 98765.4321",
        ] {
            assert_eq!(normalize(typed).as_deref(), Ok("5511987654321"), "{typed}");
        }
        assert_eq!(normalize("+1 415 555 0100").as_deref(), Ok("14155550100"));
    }

    #[test]
    fn what_cannot_be_normalised_safely_is_refused_with_the_rule() {
        assert_eq!(normalize(""), Err(PhoneError::Empty));
        assert_eq!(normalize("  + "), Err(PhoneError::Empty));
        assert_eq!(normalize("+55 11 9876x4321"), Err(PhoneError::BadCharacter));
        assert_eq!(normalize("++5511987654321"), Err(PhoneError::BadCharacter));
        assert_eq!(normalize("55#11987654321"), Err(PhoneError::BadCharacter));
        assert_eq!(normalize("005511987654321"), Err(PhoneError::LeadingZero));
        assert_eq!(normalize("011 98765 4321"), Err(PhoneError::LeadingZero));
        assert_eq!(normalize("1234567"), Err(PhoneError::Length(7)));
        assert_eq!(normalize("1234567890123456"), Err(PhoneError::Length(16)));
        assert_eq!(normalize("12345678").as_deref(), Ok("12345678"));
        assert_eq!(
            normalize("123456789012345").as_deref(),
            Ok("123456789012345")
        );
    }

    #[test]
    fn no_refusal_echoes_the_number() {
        for bad in ["5511x987654321", "05511987654321", "551198765432100000"] {
            let message = normalize(bad).unwrap_err().to_string();
            assert!(!message.contains("987654"), "{message}");
        }
    }

    #[test]
    fn a_phone_never_shows_its_digits_in_debug() {
        let p = Phone::parse("+55 11 98765-4321").unwrap();
        assert_eq!(p.digits(), "5511987654321");
        assert_eq!(format!("{p:?}"), "Phone([13 digits])");
        let parsed: Phone = serde_json::from_str("\"5511987654321\"").unwrap();
        assert_eq!(parsed, p);
        assert!(serde_json::from_str::<Phone>("\"0800\"").is_err());
    }

    #[test]
    fn long_digit_runs_are_redacted_short_ones_kept() {
        assert_eq!(
            redact_numbers("bad number 5511987654321 (code 400)"),
            "bad number [number] (code 400)"
        );
        assert_eq!(
            redact_numbers("at 12:30, 1234567 rows"),
            "at 12:30, 1234567 rows"
        );
        assert_eq!(redact_numbers("x14155550100"), "x[number]");
    }
}
