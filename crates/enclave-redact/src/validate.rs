//! Check digits and other validity rules, so that numbers which merely look like an ID are
//! left alone.

/// A real calendar date (Gregorian), years 1800–2199.
pub(crate) fn is_date(year: u32, month: u32, day: u32) -> bool {
    if !(1800..=2199).contains(&year) || !(1..=12).contains(&month) || day == 0 {
        return false;
    }
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    day <= days
}

fn digits(s: &str) -> Option<Vec<u32>> {
    s.chars().map(|c| c.to_digit(10)).collect()
}

fn number(s: &str) -> Option<u32> {
    s.parse().ok()
}

/// Mainland resident ID (GB 11643-1999): 17 digits, a real birth date at 6..14, and the ISO
/// 7064 MOD 11-2 check character (`0`–`9` or `X`).
pub(crate) fn resident_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    if bytes.len() != 18 || !id.is_ascii() {
        return false;
    }
    let Some(body) = digits(&id[..17]) else {
        return false;
    };
    let (Some(year), Some(month), Some(day)) =
        (number(&id[6..10]), number(&id[10..12]), number(&id[12..14]))
    else {
        return false;
    };
    if !is_date(year, month, day) {
        return false;
    }
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = body.iter().zip(WEIGHTS).map(|(d, w)| d * w).sum();
    let check = b"10X98765432"[(sum % 11) as usize];
    bytes[17].to_ascii_uppercase() == check
}

/// The Luhn check of card numbers (digits only).
pub(crate) fn luhn(number: &str) -> bool {
    let Some(digits) = digits(number) else {
        return false;
    };
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let d = d * 2;
                if d > 9 {
                    d - 9
                } else {
                    d
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Unified social credit code (GB 32100-2015): 17 characters of its alphabet and a check
/// character, modulo 31.
pub(crate) fn social_credit_code(code: &str) -> bool {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
    const WEIGHTS: [usize; 17] = [
        1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
    ];
    let bytes = code.as_bytes();
    if bytes.len() != 18 || !code.is_ascii() {
        return false;
    }
    let value = |b: u8| ALPHABET.iter().position(|&a| a == b);
    let mut sum = 0;
    for (b, w) in bytes[..17].iter().zip(WEIGHTS) {
        let Some(v) = value(*b) else {
            return false;
        };
        sum += v * w;
    }
    let check = (31 - sum % 31) % 31;
    value(bytes[17]) == Some(check)
}

/// Vehicle identification number (ISO 3779; the check digit at position 9 as North America and
/// China's GB 16735 require it).
pub(crate) fn vin(vin: &str) -> bool {
    let bytes = vin.as_bytes();
    if bytes.len() != 17 {
        return false;
    }
    let value = |b: u8| -> Option<u32> {
        Some(match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A' | b'J' => 1,
            b'B' | b'K' | b'S' => 2,
            b'C' | b'L' | b'T' => 3,
            b'D' | b'M' | b'U' => 4,
            b'E' | b'N' | b'V' => 5,
            b'F' | b'W' => 6,
            b'G' | b'P' | b'X' => 7,
            b'H' | b'Y' => 8,
            b'R' | b'Z' => 9,
            _ => return None,
        })
    };
    const WEIGHTS: [u32; 17] = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2];
    let mut sum = 0;
    for (b, w) in bytes.iter().zip(WEIGHTS) {
        let Some(v) = value(*b) else {
            return false;
        };
        sum += v * w;
    }
    let check = match sum % 11 {
        10 => b'X',
        d => b'0' + d as u8,
    };
    // A VIN has letters and digits; 17 digits alone are some other number.
    bytes[8] == check && bytes.iter().any(u8::is_ascii_alphabetic)
}

/// Hong Kong identity card: one or two letters, six digits, and a check digit or `A`
/// (modulo 11); `candidate` without the parentheses.
pub(crate) fn hong_kong_id(candidate: &str) -> bool {
    let bytes = candidate.as_bytes();
    let letters = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if !(1..=2).contains(&letters) || bytes.len() != letters + 7 || !candidate.is_ascii() {
        return false;
    }
    let Some(body) = digits(&candidate[letters..letters + 6]) else {
        return false;
    };
    let letter = |b: u8| u32::from(b - b'A') + 10;
    let mut sum = if letters == 2 {
        letter(bytes[0]) * 9 + letter(bytes[1]) * 8
    } else {
        36 * 9 + letter(bytes[0]) * 8
    };
    sum += body
        .iter()
        .zip([7, 6, 5, 4, 3, 2])
        .map(|(d, w)| d * w)
        .sum::<u32>();
    let check = match (11 - sum % 11) % 11 {
        10 => b'A',
        d => b'0' + d as u8,
    };
    bytes[letters + 6] == check
}

/// Taiwan national identification number: a letter, `1` or `2`, eight digits; weighted sum
/// modulo 10.
pub(crate) fn taiwan_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    if bytes.len() != 10 || !id.is_ascii() || !matches!(bytes[1], b'1' | b'2') {
        return false;
    }
    // The letters' codes, A..Z (I, O, W, X, Y, Z out of order: they were added later).
    const CODES: [u32; 26] = [
        10, 11, 12, 13, 14, 15, 16, 17, 34, 18, 19, 20, 21, 22, 35, 23, 24, 25, 26, 27, 28, 29, 32,
        30, 31, 33,
    ];
    let Some(code) = bytes[0]
        .checked_sub(b'A')
        .and_then(|i| CODES.get(usize::from(i)))
    else {
        return false;
    };
    let Some(rest) = digits(&id[1..]) else {
        return false;
    };
    let weights = [8, 7, 6, 5, 4, 3, 2, 1, 1];
    let sum =
        code / 10 + (code % 10) * 9 + rest.iter().zip(weights).map(|(d, w)| d * w).sum::<u32>();
    sum.is_multiple_of(10)
}

/// US social security number: area not 000, 666 or 9xx; group not 00; serial not 0000.
pub(crate) fn us_ssn(area: &str, group: &str, serial: &str) -> bool {
    let (Some(area), Some(group), Some(serial)) = (number(area), number(group), number(serial))
    else {
        return false;
    };
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// IBAN (ISO 13616): country, two check digits, the account; the whole modulo 97 is 1.
pub(crate) fn iban(compact: &str) -> bool {
    if !(15..=34).contains(&compact.len()) || !compact.is_ascii() {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut remainder: u64 = 0;
    for c in tail.chars().chain(head.chars()) {
        let value = match c {
            '0'..='9' => u64::from(c as u8 - b'0'),
            'A'..='Z' => u64::from(c as u8 - b'A') + 10,
            _ => return false,
        };
        let width = if value >= 10 { 100 } else { 10 };
        remainder = (remainder * width + value) % 97;
    }
    remainder == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_digits_of_published_examples() {
        // GB 11643-1999's own example, and the X check character.
        assert!(resident_id("11010519491231002X"));
        assert!(!resident_id("110105194912310021"));
        assert!(!resident_id("11010519491331002X"), "month 13");
        assert!(luhn("4111111111111111"));
        assert!(!luhn("4111111111111112"));
        assert!(social_credit_code("91350100M000100Y43"));
        assert!(!social_credit_code("91350100M000100Y44"));
        assert!(vin("1M8GDM9AXKP042788"));
        assert!(!vin("1M8GDM9A1KP042788"));
        assert!(hong_kong_id("A1234563"));
        assert!(hong_kong_id("AB9876543"));
        assert!(!hong_kong_id("A1234564"));
        assert!(taiwan_id("A123456789"));
        assert!(!taiwan_id("A123456788"));
        assert!(us_ssn("123", "45", "6789"));
        assert!(!us_ssn("666", "45", "6789"));
        assert!(!us_ssn("900", "45", "6789"));
        assert!(iban("GB82WEST12345698765432"));
        assert!(iban("DE89370400440532013000"));
        assert!(!iban("GB82WEST12345698765433"));
        assert!(is_date(2000, 2, 29) && !is_date(1900, 2, 29) && !is_date(2023, 4, 31));
    }
}
