//! Sizes and durations as people write them, and as Grid writes them back: one grammar for
//! every flag (`grid run`, `grid submit`, `grid up`, `grid node`, `grid broker`), every key of a
//! node's config file, and every message that names a limit.
//!
//! # Sizes
//!
//! A number, then a unit: `512MiB`, `1.5GiB`, `100 KB`.
//!
//! | unit | bytes |
//! |---|---|
//! | `B` | 1 |
//! | `KiB`, `MiB`, `GiB`, `TiB` | 1024, 1024², 1024³, 1024⁴ |
//! | `KB`, `MB`, `GB`, `TB` | 1000, 1000², 1000³, 1000⁴ |
//!
//! Case does not matter: `mib`, `MIB` and `MiB` are one unit, and so are `kB` and `KB`. A
//! fraction is rounded down to a whole byte.
//!
//! Refused, with a line that says what to write instead:
//! - a bare number (`--memory 100`): a parser once read that as 100 bytes while its writer
//!   meant 100 MiB. `0` alone is taken: it is the same in every unit.
//! - a lone letter (`512m`, `1G`): it could be either power, and `1G` is 7% short of `1GiB`.
//!
//! # Durations
//!
//! A number, then a unit, as [`humantime`] reads them: `250ms`, `30s`, `10min` (or `10m`),
//! `2h`, `1d`, and sums such as `1h 30min`. Units are case-sensitive (`M` is a month). A bare
//! number is refused, except `0`.
//!
//! # Floors
//!
//! Some quantities have a least useful value, checked as they are read so that a mistake is
//! one line at the command, not a failed task later: [`size_at_least`] and
//! [`duration_at_least`] say `must be at least 1 MiB`. The floors of a job's limits are
//! [`crate::JobLimits::MIN_MEMORY_BYTES`] and [`crate::JobLimits::MIN_TIME`].
//!
//! # Writing them back
//!
//! [`size_text`] and [`duration_text`] write quantities for people, in the same units:
//! `512 MiB`, `1.5 GiB`, `10m`, `1s 500ms`.
//!
//! ```
//! use grid_proto::units::{duration_text, parse_duration, parse_size, size_text};
//! use std::time::Duration;
//!
//! assert_eq!(parse_size("512MiB"), Ok(512 << 20));
//! assert_eq!(parse_size("1.5 GB"), Ok(1_500_000_000));
//! assert_eq!(parse_size("0"), Ok(0));
//! assert!(parse_size("100").unwrap_err().contains("give a unit, e.g. 100MiB"));
//! assert_eq!(parse_duration("1h 30min"), Ok(Duration::from_secs(5400)));
//! assert!(parse_duration("30").unwrap_err().contains("give a unit, e.g. 30s"));
//! assert_eq!(size_text(1536 << 20), "1.5 GiB");
//! assert_eq!(duration_text(Duration::from_millis(1500)), "1s 500ms");
//! ```

use std::time::Duration;

/// The units a size may have, as a user is told them.
const SIZE_UNITS: &str = "B, KiB, MiB, GiB, TiB; or KB, MB, GB, TB for powers of 1000";

/// The units a duration may have, as a user is told them.
const DURATION_UNITS: &str = "ms, s, min, h, d; or sums such as 1h 30min";

/// Each size unit (lower case) and its bytes.
const SIZE_FACTORS: [(&str, u64); 9] = [
    ("b", 1),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
];

/// A number without a unit (`100`, `1.5`): `Some(true)` when it is zero.
fn bare_number(s: &str) -> Option<bool> {
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    (!(whole.is_empty() && fraction.is_empty()) && digits(whole) && digits(fraction))
        .then(|| s.bytes().all(|b| b == b'0' || b == b'.'))
}

/// A size as users write it (see the module docs): bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    match bare_number(s) {
        Some(true) => return Ok(0),
        Some(false) => return Err(format!("give a unit, e.g. {s}MiB ({SIZE_UNITS})")),
        None => {}
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit = unit.trim_start();
    if bare_number(number).is_none() {
        return Err(format!(
            "not a size: write a number and a unit, e.g. 512MiB ({SIZE_UNITS})"
        ));
    }
    let Some(&(_, factor)) = SIZE_FACTORS
        .iter()
        .find(|(name, _)| unit.eq_ignore_ascii_case(name))
    else {
        if let [letter] = unit.as_bytes()
            && b"kmgtKMGT".contains(letter)
        {
            let big = letter.to_ascii_uppercase() as char;
            return Err(format!(
                "{unit:?} could be powers of 1024 or of 1000: write {number}{big}iB or {number}{big}B"
            ));
        }
        return Err(format!("unknown unit {unit:?}: sizes take {SIZE_UNITS}"));
    };
    let too_large = || format!("too large: the most is {}", size_text(u64::MAX));
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let mut bytes = whole.checked_mul(factor).ok_or_else(too_large)?;
    // The fraction's first 18 digits, exactly: past them no unit here has a byte to give.
    let digits = &fraction[..fraction.len().min(18)];
    if !digits.is_empty() {
        let numerator: u128 = digits.parse().map_err(|_| too_large())?;
        let denominator = 10u128.pow(digits.len() as u32);
        let part =
            u64::try_from(numerator * u128::from(factor) / denominator).map_err(|_| too_large())?;
        bytes = bytes.checked_add(part).ok_or_else(too_large)?;
    }
    Ok(bytes)
}

/// A duration as users write it (see the module docs).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    match bare_number(s) {
        Some(true) => return Ok(Duration::ZERO),
        Some(false) => return Err(format!("give a unit, e.g. {s}s ({DURATION_UNITS})")),
        None => {}
    }
    humantime::parse_duration(s).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. } => {
            format!("unknown unit {unit:?}: durations take {DURATION_UNITS}")
        }
        e => format!("{e} (write durations like 30s, 10min or 1h 30min)"),
    })
}

/// [`parse_size`], and at least `least` bytes.
pub fn size_at_least(text: &str, least: u64) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if bytes < least {
        return Err(format!("must be at least {}", size_text(least)));
    }
    Ok(bytes)
}

/// [`parse_duration`], and at least `least`.
pub fn duration_at_least(text: &str, least: Duration) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < least {
        return Err(format!("must be at least {}", duration_text(least)));
    }
    Ok(duration)
}

/// `512 MiB`, `1.5 GiB`, `100 B`: a byte count for people, in powers of 1024, to a tenth.
pub fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `10m`, `1h 30m`, `1s 500ms`, `0s`: a duration for people (humantime's spelling, which
/// [`parse_duration`] reads back).
pub fn duration_text(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// [`duration_text`] of a count of milliseconds (how limits travel).
pub fn millis_text(ms: u64) -> String {
    duration_text(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_and_decimal_units_in_any_case() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64 mib"), Ok(64 << 20));
        assert_eq!(parse_size("1GIB"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("100KB"), Ok(100_000));
        assert_eq!(parse_size("100kB"), Ok(100_000));
        assert_eq!(parse_size("3GB"), Ok(3_000_000_000));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size(" 1.5GiB "), Ok(3 << 29));
        assert_eq!(parse_size("0.5KiB"), Ok(512));
        assert_eq!(parse_size(".5KiB"), Ok(512));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("0.0"), Ok(0));
        assert_eq!(parse_size("0MiB"), Ok(0));
    }

    #[test]
    fn a_size_without_a_clear_unit_is_refused_with_what_to_write() {
        let e = parse_size("100").unwrap_err();
        assert!(e.starts_with("give a unit, e.g. 100MiB"), "{e}");
        let e = parse_size("512m").unwrap_err();
        assert!(e.contains("write 512MiB or 512MB"), "{e}");
        let e = parse_size("1G").unwrap_err();
        assert!(e.contains("write 1GiB or 1GB"), "{e}");
        let e = parse_size("3 furlongs").unwrap_err();
        assert!(e.starts_with("unknown unit \"furlongs\""), "{e}");
        for nonsense in ["", "lots", "-1MiB", "1.2.3MiB", "MiB", "."] {
            assert!(parse_size(nonsense).is_err(), "{nonsense:?}");
        }
    }

    #[test]
    fn a_size_too_large_for_64_bits_is_refused_not_wrapped() {
        let e = parse_size("16777216TiB").unwrap_err();
        assert!(e.starts_with("too large"), "{e}");
        assert!(parse_size("99999999999999999999B").is_err());
        assert_eq!(parse_size("16777215TiB"), Ok(16_777_215 << 40));
    }

    #[test]
    fn durations_take_units_and_refuse_bare_numbers_but_zero() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10min"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h 30min"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        let e = parse_duration("30").unwrap_err();
        assert!(e.starts_with("give a unit, e.g. 30s"), "{e}");
        let e = parse_duration("3 fortnights").unwrap_err();
        assert!(e.starts_with("unknown unit \"fortnights\""), "{e}");
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn floors_are_stated_in_human_units() {
        assert_eq!(
            size_at_least("0", 1 << 20),
            Err("must be at least 1 MiB".into())
        );
        assert_eq!(size_at_least("1MiB", 1 << 20), Ok(1 << 20));
        assert_eq!(
            duration_at_least("0s", Duration::from_millis(1)),
            Err("must be at least 1ms".into())
        );
        assert_eq!(
            duration_at_least("500us", Duration::from_millis(1)),
            Err("must be at least 1ms".into())
        );
        let e = size_at_least("100", 1 << 20).unwrap_err();
        assert!(e.starts_with("give a unit"), "the grammar first: {e}");
    }

    #[test]
    fn quantities_are_written_back_in_the_units_they_are_read_in() {
        assert_eq!(size_text(0), "0 B");
        assert_eq!(size_text(100), "100 B");
        assert_eq!(size_text(1 << 20), "1 MiB");
        assert_eq!(size_text(512 << 20), "512 MiB");
        assert_eq!(size_text(3 << 29), "1.5 GiB");
        assert_eq!(duration_text(Duration::from_secs(600)), "10m");
        assert_eq!(millis_text(1), "1ms");
        for text in ["512 MiB", "1.5 GiB", "1 MiB"] {
            assert_eq!(size_text(parse_size(text).unwrap()), text);
        }
        for d in [Duration::from_secs(5400), Duration::from_millis(1500)] {
            assert_eq!(parse_duration(&duration_text(d)), Ok(d));
        }
    }
}
