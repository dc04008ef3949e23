//! Kubernetes-style byte quantities (`512Mi`, `2Gi`, `1.5G`, `129e6`).

use std::fmt;

/// A byte count written as a Kubernetes quantity; keeps the vendor's spelling for display.
#[derive(Clone, PartialEq, Eq)]
pub struct ByteQuantity {
    text: String,
    bytes: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct QuantityError(String);

impl ByteQuantity {
    /// Parses the Kubernetes quantity grammar restricted to whole bytes: a decimal number with
    /// an optional binary (Ki..Ei), decimal (k, M..E) or exponent (e6) suffix.
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        let multiplier = multiplier(suffix).ok_or_else(|| suffix_error(text, suffix))?;
        let (whole, fraction) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        if whole.is_empty() && fraction.is_empty() || number.matches('.').count() > 1 {
            return Err(QuantityError(format!(
                "{text:?} is not a quantity: expected a number with an optional unit such as 512Mi or 2Gi"
            )));
        }
        let too_large = || QuantityError(format!("{text:?} is too large"));
        if whole.len() + fraction.len() > 30 {
            return Err(too_large());
        }
        let digits: u128 = format!("{whole}{fraction}").parse().unwrap_or(0);
        let scale = 10u128.pow(fraction.len() as u32);
        let scaled = digits.checked_mul(multiplier).ok_or_else(too_large)?;
        let bytes = scaled.div_ceil(scale);
        let bytes = u64::try_from(bytes).map_err(|_| too_large())?;
        Ok(ByteQuantity {
            text: text.to_string(),
            bytes,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

fn multiplier(suffix: &str) -> Option<u128> {
    let binary = |power: u32| Some(1024u128.pow(power));
    let decimal = |power: u32| Some(1000u128.pow(power));
    match suffix {
        "" => Some(1),
        "Ki" => binary(1),
        "Mi" => binary(2),
        "Gi" => binary(3),
        "Ti" => binary(4),
        "Pi" => binary(5),
        "Ei" => binary(6),
        "k" => decimal(1),
        "M" => decimal(2),
        "G" => decimal(3),
        "T" => decimal(4),
        "P" => decimal(5),
        "E" => decimal(6),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let exponent: u32 = exponent
                .strip_prefix('+')
                .unwrap_or(exponent)
                .parse()
                .ok()?;
            (exponent <= 30).then(|| 10u128.pow(exponent))
        }
    }
}

fn suffix_error(text: &str, suffix: &str) -> QuantityError {
    let hint = match suffix
        .trim_end_matches(['B', 'b'])
        .to_ascii_uppercase()
        .as_str()
    {
        "K" | "KI" => Some(("Ki", "k")),
        "M" | "MI" => Some(("Mi", "M")),
        "G" | "GI" => Some(("Gi", "G")),
        "T" | "TI" => Some(("Ti", "T")),
        "P" | "PI" => Some(("Pi", "P")),
        "E" | "EI" => Some(("Ei", "E")),
        _ => None,
    };
    let number = &text[..text.len() - suffix.len()];
    match hint {
        Some((binary, decimal)) => QuantityError(format!(
            "{text:?} is not a Kubernetes quantity: did you mean {number}{binary} (binary) or {number}{decimal} (decimal)?"
        )),
        None => QuantityError(format!(
            "{text:?} is not a Kubernetes quantity: unknown unit {suffix:?} (use Ki, Mi, Gi, Ti or k, M, G, T)"
        )),
    }
}

impl fmt::Display for ByteQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for ByteQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", self.text, self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        let bytes = |t: &str| ByteQuantity::parse(t).map(|q| q.bytes());
        assert_eq!(bytes("512Mi"), Ok(512 * 1024 * 1024));
        assert_eq!(bytes("2Gi"), Ok(2 << 30));
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(bytes("129e6"), Ok(129_000_000));
        assert_eq!(bytes("100"), Ok(100));
        assert_eq!(bytes(".5Ki"), Ok(512));
        let err = ByteQuantity::parse("1GB").unwrap_err().to_string();
        assert!(err.contains("did you mean 1Gi"), "{err}");
        for bad in [
            "",
            "Gi",
            "1.2.3Gi",
            "-1Gi",
            "1 Gi",
            "1m",
            "99999999999999999999Ei",
            "1e31",
        ] {
            assert!(ByteQuantity::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn binary_suffixes_round_trip(n in 0u64..1_000_000, unit in 0usize..5) {
            let (suffix, factor) = [("", 1u64), ("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("k", 1000)][unit];
            let q = ByteQuantity::parse(&format!("{n}{suffix}")).unwrap();
            prop_assert_eq!(q.bytes(), n * factor);
        }

        #[test]
        fn never_panics(text in "\\PC{0,24}") {
            let _ = ByteQuantity::parse(&text);
        }

        #[test]
        fn decimals_round_up_to_whole_bytes(whole in 0u64..1000, frac in 1u64..1000) {
            let q = ByteQuantity::parse(&format!("{whole}.{frac:03}Ki")).unwrap();
            let exact = (whole * 1000 + frac) as f64 * 1.024;
            prop_assert!(q.bytes() as f64 >= exact - 1e-6 && (q.bytes() as f64) < exact + 1.0);
        }
    }
}
