//! Sensitive-data detection and redaction: finds personal data and secrets in text and
//! replaces each with a typed placeholder (`[ID_CARD]`, `[MOBILE]`, …). Where a number carries
//! a check digit (resident IDs, cards, credit codes, VINs, IBANs, Hong Kong and Taiwan IDs)
//! it must verify, and numeric values embedded in longer runs of digits or letters are left
//! alone, so near-misses are not redacted. Detection runs on the text as it reads
//! (`normalize`: NFKC, default-ignorable characters dropped), so full-width digits and digits
//! split by zero-width characters are found too; findings are spans of the original. A text
//! that ends a completion ([`Redactor::redact_ending`], [`StreamRedactor::finish`]) also loses
//! a value cut short at its very end (by `max_tokens` or a stop sequence): most of an ID,
//! mobile or card number, a key's or token's prefix. Knows nothing of HTTP or policies: the
//! server decides what to do with the findings.
//!
//! Invariants:
//! - [`Redactor::redact`] never panics and leaves a text without findings unchanged.
//! - [`StreamRedactor`] over any split of a text into chunks outputs exactly what
//!   [`Redactor::redact_ending`] outputs for the whole text.

mod normalize;
mod validate;

use normalize::Normalized;

use std::fmt;
use std::sync::Arc;

use regex::Regex;

/// What went wrong building a redactor.
#[derive(Debug, thiserror::Error)]
pub enum RedactError {
    #[error("custom pattern `{name}`: {message}")]
    InvalidPattern { name: String, message: String },
    #[error("unknown category `{0}` (known: {known})", known = Category::BUILT_IN.map(|c| c.name().to_string()).join(", "))]
    UnknownCategory(String),
}

/// A kind of sensitive value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// Mainland China resident identity card number (18 characters, check character).
    IdCard,
    /// Mainland China mobile number (with or without +86).
    Mobile,
    /// Mainland China landline number with its area code.
    Landline,
    /// Bank card number (13–19 digits, Luhn).
    BankCard,
    Email,
    Ipv4,
    Ipv6,
    /// Chinese passport number.
    Passport,
    /// Unified social credit code of an organisation (check character).
    SocialCreditCode,
    /// Chinese licence plate.
    LicensePlate,
    /// Vehicle identification number (check digit).
    Vin,
    /// Hong Kong identity card number (check digit).
    HongKongId,
    /// Taiwan national identification number (check digit).
    TaiwanId,
    /// US social security number.
    UsSsn,
    /// International bank account number (mod 97).
    Iban,
    /// A date of birth, where the text says it is one.
    BirthDate,
    /// A PEM or PGP private-key block.
    PrivateKey,
    /// Cloud and service access keys (AWS, Alibaba Cloud, Tencent Cloud, Google, GitHub, Slack,
    /// OpenAI-style `sk-…`) and secrets named as such.
    CloudKey,
    /// Bearer tokens, JWTs and Enclave API keys.
    BearerToken,
    /// A pattern from the configuration, by its name.
    Custom(Arc<str>),
}

impl Category {
    /// Every built-in category, in priority order (the first wins where two overlap).
    pub const BUILT_IN: [Category; 19] = [
        Category::PrivateKey,
        Category::BearerToken,
        Category::CloudKey,
        Category::Email,
        Category::IdCard,
        Category::SocialCreditCode,
        Category::Iban,
        Category::Vin,
        Category::BankCard,
        Category::HongKongId,
        Category::TaiwanId,
        Category::UsSsn,
        Category::Passport,
        Category::LicensePlate,
        Category::BirthDate,
        Category::Ipv6,
        Category::Ipv4,
        Category::Mobile,
        Category::Landline,
    ];

    /// The name used in configuration and JSON (`id_card`).
    pub fn name(&self) -> &str {
        match self {
            Category::IdCard => "id_card",
            Category::Mobile => "mobile",
            Category::Landline => "landline",
            Category::BankCard => "bank_card",
            Category::Email => "email",
            Category::Ipv4 => "ipv4",
            Category::Ipv6 => "ipv6",
            Category::Passport => "passport",
            Category::SocialCreditCode => "social_credit_code",
            Category::LicensePlate => "license_plate",
            Category::Vin => "vin",
            Category::HongKongId => "hong_kong_id",
            Category::TaiwanId => "taiwan_id",
            Category::UsSsn => "us_ssn",
            Category::Iban => "iban",
            Category::BirthDate => "birth_date",
            Category::PrivateKey => "private_key",
            Category::CloudKey => "cloud_key",
            Category::BearerToken => "bearer_token",
            Category::Custom(name) => name,
        }
    }

    /// The placeholder that replaces a value (`[ID_CARD]`).
    pub fn placeholder(&self) -> String {
        format!("[{}]", self.name().to_ascii_uppercase())
    }

    /// A built-in category by name.
    pub fn parse(name: &str) -> Result<Category, RedactError> {
        Category::BUILT_IN
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| RedactError::UnknownCategory(name.to_string()))
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One sensitive value: its category and byte span in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub category: Category,
    pub start: usize,
    pub end: usize,
}

/// A redacted text and what was found in the original.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redacted {
    pub text: String,
    pub findings: Vec<Finding>,
}

/// Which characters may not touch a value on either side.
#[derive(Debug, Clone, Copy)]
enum Edge {
    /// ASCII letters and digits (numbers and codes inside longer runs are something else).
    Alphanumeric,
    /// Digits only.
    Digit,
    /// Digits, and a dot with a digit beyond it (an address inside `1.2.3.4.5` is a version).
    DottedDigits,
    /// Anything goes (the pattern delimits itself).
    None,
}

impl Edge {
    /// Whether `text[start..end]` touches a character it may not.
    fn touches(self, text: &str, start: usize, end: usize) -> bool {
        let blocks = |c: char| match self {
            Edge::Alphanumeric => c.is_ascii_alphanumeric(),
            Edge::Digit | Edge::DottedDigits => c.is_ascii_digit(),
            Edge::None => false,
        };
        let mut before = text[..start].chars().rev();
        let mut after = text[end..].chars();
        let (b1, b2) = (before.next(), before.next());
        let (a1, a2) = (after.next(), after.next());
        if b1.is_some_and(blocks) || a1.is_some_and(blocks) {
            return true;
        }
        matches!(self, Edge::DottedDigits)
            && ((b1 == Some('.') && b2.is_some_and(|c| c.is_ascii_digit()))
                || (a1 == Some('.') && a2.is_some_and(|c| c.is_ascii_digit())))
    }
}

/// Accepts or rejects a candidate (the value's text).
type Check = fn(&str) -> bool;

struct Detector {
    category: Category,
    regex: Regex,
    /// The value is capture group 1 when the pattern has context around it.
    group: bool,
    edge: Edge,
    check: Option<Check>,
}

fn accept(_: &str) -> bool {
    true
}

fn compact(value: &str) -> String {
    value.chars().filter(|c| !matches!(c, ' ' | '-')).collect()
}

fn id_card(v: &str) -> bool {
    validate::resident_id(v)
}

fn bank_card(v: &str) -> bool {
    let digits = compact(v);
    (13..=19).contains(&digits.len()) && validate::luhn(&digits)
}

fn mobile(v: &str) -> bool {
    let digits: String = v.chars().filter(char::is_ascii_digit).collect();
    let national = digits
        .strip_prefix("0086")
        .or_else(|| digits.strip_prefix("86").filter(|_| digits.len() == 13))
        .unwrap_or(&digits);
    national.len() == 11
}

fn ipv4(v: &str) -> bool {
    v.split('.').count() == 4
        && v.split('.').all(|octet| {
            octet.parse::<u8>().is_ok() && (octet.len() == 1 || !octet.starts_with('0'))
        })
}

fn ipv6(v: &str) -> bool {
    let groups = v.split(':').filter(|g| !g.is_empty()).count();
    groups >= 2 && v.parse::<std::net::Ipv6Addr>().is_ok()
}

fn social_credit_code(v: &str) -> bool {
    validate::social_credit_code(v)
}

fn vin(v: &str) -> bool {
    validate::vin(v)
}

fn hong_kong_id(v: &str) -> bool {
    let bare: String = v.chars().filter(|c| !matches!(c, '(' | ')')).collect();
    // Parentheses come in pairs or not at all.
    v.contains('(') == v.contains(')') && validate::hong_kong_id(&bare)
}

fn taiwan_id(v: &str) -> bool {
    validate::taiwan_id(v)
}

fn us_ssn(v: &str) -> bool {
    let parts: Vec<&str> = v.split(['-', ' ']).collect();
    matches!(parts.as_slice(), [a, g, s] if validate::us_ssn(a, g, s))
        && (v.matches('-').count() == 2 || v.matches(' ').count() == 2)
}

fn iban(v: &str) -> bool {
    validate::iban(&compact(v))
}

fn birth_date(v: &str) -> bool {
    let parts: Vec<u32> = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect();
    match parts.as_slice() {
        [y, m, d] if *y >= 1000 => validate::is_date(*y, *m, *d),
        // 07/03/1990: day first or month first, either read must be a date.
        [a, b, y] => validate::is_date(*y, *b, *a) || validate::is_date(*y, *a, *b),
        _ => false,
    }
}

/// The built-in detectors, in [`Category::BUILT_IN`] order.
fn built_in() -> Vec<Detector> {
    let d = |category: Category, pattern: &str, group: bool, edge: Edge, check: Check| {
        (category, pattern.to_string(), group, edge, check)
    };
    let specs = [
        d(
            Category::PrivateKey,
            // An unterminated block (a reply cut off by `max_tokens`) runs to the end of the text.
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|[\s\S]*\z)",
            false,
            Edge::None,
            accept,
        ),
        d(
            Category::BearerToken,
            r"(?i:bearer)\s+([A-Za-z0-9._~+/=-]{16,})|(eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*|enc_[0-9a-f]{16}_[0-9a-f]{64})",
            true,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::CloudKey,
            r#"((?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|AIPA)[A-Z0-9]{16}|LTAI[A-Za-z0-9]{12,20}|AKID[A-Za-z0-9]{13,40}|AIza[0-9A-Za-z_-]{35}|gh[pousr]_[A-Za-z0-9]{36,255}|xox[abprs]-[A-Za-z0-9-]{10,}|sk-(?:proj-)?[A-Za-z0-9_-]{20,})|(?i:aws_secret_access_key|secret_access_key|access_key_secret|accesskeysecret|secretkey|secret_key)\s*[=:]\s*["']?([A-Za-z0-9/+=]{20,})"#,
            true,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::Email,
            r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}",
            false,
            Edge::None,
            accept,
        ),
        d(
            Category::IdCard,
            r"[1-9][0-9]{5}(?:18|19|20|21)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9Xx]",
            false,
            Edge::Alphanumeric,
            id_card,
        ),
        d(
            Category::SocialCreditCode,
            r"[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-HJ-NPQRTUWXY]{10}",
            false,
            Edge::Alphanumeric,
            social_credit_code,
        ),
        d(
            Category::Iban,
            r"[A-Z]{2}[0-9]{2}(?:(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?|[A-Z0-9]{11,30})",
            false,
            Edge::Alphanumeric,
            iban,
        ),
        d(
            Category::Vin,
            r"[A-HJ-NPR-Z0-9]{17}",
            false,
            Edge::Alphanumeric,
            vin,
        ),
        d(
            Category::BankCard,
            r"[0-9]{4}(?:[ -][0-9]{4}){2,3}(?:[ -][0-9]{1,3})?|[0-9]{13,19}",
            false,
            Edge::Alphanumeric,
            bank_card,
        ),
        d(
            Category::HongKongId,
            r"[A-Z]{1,2}[0-9]{6}(?:\([0-9A]\)|[0-9A])",
            false,
            Edge::Alphanumeric,
            hong_kong_id,
        ),
        d(
            Category::TaiwanId,
            r"[A-Z][12][0-9]{8}",
            false,
            Edge::Alphanumeric,
            taiwan_id,
        ),
        d(
            Category::UsSsn,
            r"[0-9]{3}-[0-9]{2}-[0-9]{4}|[0-9]{3} [0-9]{2} [0-9]{4}",
            false,
            Edge::Alphanumeric,
            us_ssn,
        ),
        d(
            Category::Passport,
            r"[EG][0-9]{8}|E[A-HJ-NP-Z][0-9]{7}|[DPS]E?[0-9]{7}",
            false,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::LicensePlate,
            r"[京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼][A-HJ-NP-Z][·•\s]?(?:[DF][A-HJ-NP-Z0-9][0-9]{4}|[0-9]{5}[DF]|[A-HJ-NP-Z0-9]{4}[挂学警港澳]|[A-HJ-NP-Z0-9]{5})",
            false,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::BirthDate,
            r"(?i:出生日期|出生年月日|出生于|出生|生日|生于|date of birth|birth ?date|birthday|born on|born|d\.o\.b\.?|dob)\s*[:：是为]?\s*([0-9]{4}\s*[-/.年]\s*[0-9]{1,2}\s*[-/.月]\s*[0-9]{1,2}\s*日?|[0-9]{1,2}[-/.][0-9]{1,2}[-/.][0-9]{4})",
            true,
            Edge::Digit,
            birth_date,
        ),
        d(
            Category::Ipv6,
            r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|[0-9]{1,3}(?:\.[0-9]{1,3}){3})?",
            false,
            Edge::Alphanumeric,
            ipv6,
        ),
        d(
            Category::Ipv4,
            r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}",
            false,
            Edge::DottedDigits,
            ipv4,
        ),
        d(
            Category::Mobile,
            r"(?:\+86[ -]?|0086[ -]?)?1[3-9][0-9](?:[ -]?[0-9]{4}){2}",
            false,
            Edge::Alphanumeric,
            mobile,
        ),
        d(
            Category::Landline,
            r"(?:\(0[0-9]{2,3}\) ?|0[0-9]{2,3}-)[2-9][0-9]{6,7}",
            false,
            Edge::Alphanumeric,
            accept,
        ),
    ];
    // The patterns are constants, tested to compile (`every_built_in_pattern_compiles`).
    compile(specs)
}

/// The detectors of `(category, pattern, group, edge, check)` specifications; a pattern that
/// does not compile is left out (the tests compile every one).
fn compile(
    specs: impl IntoIterator<Item = (Category, String, bool, Edge, Check)>,
) -> Vec<Detector> {
    specs
        .into_iter()
        .filter_map(|(category, pattern, group, edge, check)| {
            Regex::new(&pattern).ok().map(|regex| Detector {
                category,
                regex,
                group,
                edge,
                check: Some(check),
            })
        })
        .collect()
}

/// Bytes at the end of a text searched for a value cut short (longer than any prefix the
/// partial patterns take).
const PARTIAL_WINDOW: usize = 1024;

fn digits(v: &str) -> usize {
    v.chars().filter(char::is_ascii_digit).count()
}

/// A card of 13 to 16 digits short of one to four; longer runs that fail the Luhn check are
/// near-misses, not prefixes.
fn partial_card(v: &str) -> bool {
    (12..=15).contains(&digits(v))
}

fn has_digit(v: &str) -> bool {
    digits(v) > 0
}

fn digit_and_letter(v: &str) -> bool {
    has_digit(v) && v.chars().any(|c| c.is_ascii_alphabetic())
}

/// Most of a value, at the very end of a text: what a completion cut by `max_tokens` or a
/// stop sequence one or a few characters short of a whole value shows. Each leaves out at most
/// a few characters of the shortest whole value of its category (an ID card's last five, a
/// mobile number's last two — eight digits starting `1` are as often a count —, a 13- to
/// 16-digit card's last one to four), or is a key's or token's distinctive prefix; shorter runs
/// are ordinary numbers.
fn partial_values() -> Vec<Detector> {
    let d = |category: Category, pattern: &str, group: bool, edge: Edge, check: Check| {
        (category, format!("(?:{pattern})\\z"), group, edge, check)
    };
    let specs = [
        d(
            Category::BearerToken,
            r"(?i:bearer)\s+([A-Za-z0-9._~+/=-]{8,15})|(eyJ[A-Za-z0-9_-]{4,}(?:\.(?:eyJ[A-Za-z0-9_-]*)?)?|enc_[0-9a-f]{4,16}(?:_[0-9a-f]{0,63})?)",
            true,
            Edge::Alphanumeric,
            has_digit,
        ),
        d(
            Category::CloudKey,
            r"(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|AIPA)[A-Z0-9]{4,15}|LTAI[A-Za-z0-9]{4,11}|AKID[A-Za-z0-9]{4,12}|AIza[0-9A-Za-z_-]{4,34}|gh[pousr]_[A-Za-z0-9]{4,35}|xox[abprs]-[A-Za-z0-9-]{4,9}|sk-(?:proj-)?[A-Za-z0-9_-]{4,19}",
            false,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::Email,
            r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]*(?:\.[A-Za-z0-9-]*)*",
            false,
            Edge::None,
            accept,
        ),
        d(
            Category::IdCard,
            r"[1-9][0-9]{5}(?:18|19|20|21)[0-9]{2}(?:0[1-9]|1[0-2])[0-9]{1,5}",
            false,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::Mobile,
            r"(?:\+86[ -]?|0086[ -]?)?1[3-9][0-9](?:[ -]?[0-9]){6,7}",
            false,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::BankCard,
            r"[0-9]{4}(?:[ -][0-9]{1,4}){2,3}|[0-9]{12,15}",
            false,
            Edge::Alphanumeric,
            partial_card,
        ),
        d(
            Category::SocialCreditCode,
            r"[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-HJ-NPQRTUWXY]{5,9}",
            false,
            Edge::Alphanumeric,
            digit_and_letter,
        ),
        d(
            Category::Vin,
            r"[A-HJ-NPR-Z0-9]{13,16}",
            false,
            Edge::Alphanumeric,
            digit_and_letter,
        ),
        d(
            Category::Passport,
            r"[EG][0-9]{5,7}|E[A-HJ-NP-Z][0-9]{4,6}",
            false,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::HongKongId,
            r"[A-Z]{1,2}[0-9]{6}\(?",
            false,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::TaiwanId,
            r"[A-Z][12][0-9]{5,7}",
            false,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::UsSsn,
            r"[0-9]{3}-[0-9]{2}-[0-9]{1,3}|[0-9]{3} [0-9]{2} [0-9]{1,3}",
            false,
            Edge::Alphanumeric,
            accept,
        ),
        d(
            Category::Landline,
            r"(?:\(0[0-9]{2,3}\) ?|0[0-9]{2,3}-)[2-9][0-9]{3,6}",
            false,
            Edge::Alphanumeric,
            accept,
        ),
    ];
    // Constants, tested to compile (`every_partial_pattern_compiles`).
    compile(specs)
}

/// Finds and replaces sensitive values. Cheap to share (`Arc` it); building compiles the
/// patterns once.
pub struct Redactor {
    detectors: Vec<Detector>,
    /// Prefixes of values at the very end of a text, for the categories in `detectors`.
    partials: Vec<Detector>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field(
                "categories",
                &self
                    .detectors
                    .iter()
                    .map(|d| d.category.name())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for Redactor {
    /// Every built-in category.
    fn default() -> Self {
        Self {
            detectors: built_in(),
            partials: partial_values(),
        }
    }
}

impl Redactor {
    /// Only `categories` (built-in names) and `custom` patterns (name → regular expression).
    pub fn new(
        categories: Option<&[String]>,
        custom: &[(String, String)],
    ) -> Result<Self, RedactError> {
        let mut detectors = built_in();
        let mut partials = partial_values();
        if let Some(names) = categories {
            let wanted = names
                .iter()
                .map(|n| Category::parse(n))
                .collect::<Result<Vec<_>, _>>()?;
            detectors.retain(|d| wanted.contains(&d.category));
            partials.retain(|d| wanted.contains(&d.category));
        }
        for (name, pattern) in custom {
            let valid_name = !name.is_empty()
                && name.len() <= 32
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid_name {
                return Err(RedactError::InvalidPattern {
                    name: name.clone(),
                    message: "a name is 1–32 lowercase letters, digits or `_`".into(),
                });
            }
            if Category::parse(name).is_ok() {
                return Err(RedactError::InvalidPattern {
                    name: name.clone(),
                    message: "that is a built-in category's name".into(),
                });
            }
            let regex = regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| RedactError::InvalidPattern {
                    name: name.clone(),
                    message: e.to_string(),
                })?;
            detectors.push(Detector {
                category: Category::Custom(Arc::from(name.as_str())),
                regex,
                group: false,
                edge: Edge::None,
                check: None,
            });
        }
        Ok(Self {
            detectors,
            partials,
        })
    }

    /// The categories this redactor looks for.
    pub fn categories(&self) -> Vec<Category> {
        self.detectors.iter().map(|d| d.category.clone()).collect()
    }

    /// Every sensitive value in `text`, by byte span, in order, not overlapping.
    pub fn find(&self, text: &str) -> Vec<Finding> {
        self.find_after(text, 0, false)
    }

    /// Findings that start at or after `from` (the text before is context only); with
    /// `ending`, also a value cut short at the very end of the text.
    ///
    /// Detection runs on the normalized text. Detectors run in priority order and a
    /// candidate is kept only if it overlaps nothing kept before it. Kept spans never
    /// overlap, so ordered by start they are ordered by end too; one detector's candidates come
    /// in order and never overlap each other. So each detector is one sweep over its candidates
    /// and the kept spans together, and its keepers are merged in: linear per detector,
    /// O(detectors × findings) in all.
    fn find_after(&self, original: &str, from: usize, ending: bool) -> Vec<Finding> {
        let normalized = Normalized::new(original);
        let text: &str = &normalized.text;
        let from = normalized.to_normalized(from);
        // (start, end, category), ordered by start.
        let mut picked: Vec<(usize, usize, &Category)> = Vec::new();
        for detector in &self.detectors {
            let mut kept = Vec::new();
            let mut next = 0;
            for (start, end) in detector.candidates(text) {
                if start < from {
                    continue;
                }
                // Skip the kept spans that end before this candidate starts; the next one is
                // the only one that could overlap it.
                while picked.get(next).is_some_and(|&(_, e, _)| e <= start) {
                    next += 1;
                }
                if picked.get(next).is_none_or(|&(s, _, _)| s >= end) {
                    kept.push((start, end, &detector.category));
                }
            }
            if !kept.is_empty() {
                picked = merge_by_start(&picked, &kept);
            }
        }
        if ending {
            if let Some(tail) = self.partial_tail(text, from, &picked) {
                picked.push(tail);
            }
        }
        let mut findings: Vec<Finding> = Vec::with_capacity(picked.len());
        for (start, end, category) in picked {
            let (start, end) = normalized.to_original(start, end);
            // Two values inside one original character's expansion cannot both be replaced.
            if findings.last().is_some_and(|f| f.end > start) || end <= start {
                continue;
            }
            findings.push(Finding {
                category: category.clone(),
                start,
                end,
            });
        }
        findings
    }

    /// A value cut short at the end of `text` (normalized), starting at or after `from` and
    /// overlapping none of `picked`.
    fn partial_tail<'d>(
        &'d self,
        text: &str,
        from: usize,
        picked: &[(usize, usize, &'d Category)],
    ) -> Option<(usize, usize, &'d Category)> {
        // Longer than any value's prefix these patterns take; only the tail is searched, and
        // only after the last finding (a prefix pattern without edges, such as an e-mail
        // address's, would otherwise start inside it and be dropped).
        let covered_to = picked.last().map_or(0, |&(_, end, _)| end);
        let mut window = text
            .len()
            .saturating_sub(PARTIAL_WINDOW)
            .max(from)
            .max(covered_to)
            .min(text.len());
        while !text.is_char_boundary(window) {
            window += 1;
        }
        self.partials.iter().find_map(|detector| {
            detector
                .candidates_from(text, window)
                .into_iter()
                .find(|&(start, end)| end == text.len() && start >= covered_to)
                .map(|(start, end)| (start, end, &detector.category))
        })
    }

    /// `text` with every finding replaced by its placeholder.
    pub fn redact(&self, text: &str) -> Redacted {
        let findings = self.find(text);
        Redacted {
            text: replace(text, &findings),
            findings,
        }
    }

    /// [`Self::redact`] for a text that ends a completion: a value cut short at its very end
    /// is replaced too.
    pub fn redact_ending(&self, text: &str) -> Redacted {
        let findings = self.find_after(text, 0, true);
        Redacted {
            text: replace(text, &findings),
            findings,
        }
    }

    /// A redactor for one stream of chunks (a streamed completion).
    pub fn stream(self: &Arc<Self>) -> StreamRedactor {
        StreamRedactor {
            redactor: self.clone(),
            pending: String::new(),
            context: String::new(),
            findings: Vec::new(),
        }
    }
}

impl Detector {
    /// Spans of valid values: the match (or its group), not touching `edge` characters, and
    /// passing the check. After a rejected candidate the search goes on from its next
    /// character, so a valid value overlapping a rejected one is still found.
    fn candidates(&self, text: &str) -> Vec<(usize, usize)> {
        self.candidates_from(text, 0)
    }

    /// [`Self::candidates`] starting at byte `at` (a character boundary; what is before it is
    /// context for the edges only).
    fn candidates_from(&self, text: &str, mut at: usize) -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        while at <= text.len() {
            let Some(captures) = self.regex.captures_at(text, at) else {
                break;
            };
            let Some(whole) = captures.get(0) else {
                break;
            };
            let value = if self.group {
                captures.iter().skip(1).flatten().next().unwrap_or(whole)
            } else {
                whole
            };
            let (start, end) = (value.start(), value.end());
            let edged = self.edge.touches(text, start, end);
            let valid =
                end > start && !edged && self.check.is_none_or(|check| check(&text[start..end]));
            if valid {
                found.push((start, end));
                at = whole.end().max(at + 1);
            } else {
                // Try again from the next character of the rejected match.
                at = whole.start()
                    + text[whole.start()..]
                        .chars()
                        .next()
                        .map_or(1, char::len_utf8);
            }
            while !text.is_char_boundary(at.min(text.len())) {
                at += 1;
            }
        }
        found
    }
}

/// Two lists of spans ordered by start, as one.
fn merge_by_start<'c>(
    a: &[(usize, usize, &'c Category)],
    b: &[(usize, usize, &'c Category)],
) -> Vec<(usize, usize, &'c Category)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].0 <= b[j].0 {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

fn replace(text: &str, findings: &[Finding]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in findings {
        out.push_str(&text[at..f.start]);
        out.push_str(&f.category.placeholder());
        at = f.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Bytes of text held back at the end of a stream (longer than any fixed-length value with its
/// separators and context words), so a value split across chunks is seen whole.
const HOLD: usize = 256;
/// Most visible bytes held for an unfinished private-key block or token before they are
/// released.
const MAX_HOLD: usize = 64 << 10;
/// Most bytes held in all, hidden characters included (each push scans what is held).
const MAX_HELD_BYTES: usize = 4 * MAX_HOLD;

/// Redacts a stream chunk by chunk: each [`StreamRedactor::push`] returns the redacted text that
/// is final so far, keeping back the end that a value may still be growing into;
/// [`StreamRedactor::finish`] returns the rest.
#[derive(Debug)]
pub struct StreamRedactor {
    redactor: Arc<Redactor>,
    /// Original text not yet released.
    pending: String,
    /// The last released original text (for the edges and context words of what follows).
    context: String,
    findings: Vec<Finding>,
}

impl StreamRedactor {
    /// Adds `chunk`; returns the redacted text that can be released now (possibly empty).
    pub fn push(&mut self, chunk: &str) -> String {
        self.pending.push_str(chunk);
        self.release(false)
    }

    /// The rest, redacted, at the end of the stream.
    pub fn finish(&mut self) -> String {
        self.release(true)
    }

    /// Categories found so far (in the released text).
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    fn release(&mut self, all: bool) -> String {
        let offset = self.context.len();
        let text = format!("{}{}", self.context, self.pending);
        let found = self.redactor.find_after(&text, offset, all);
        let mut cut = if all {
            text.len()
        } else {
            self.safe_cut(&text, offset, &found)
        };
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut <= offset {
            return String::new();
        }
        let released: Vec<Finding> = found.into_iter().filter(|f| f.end <= cut).collect();
        let mut out = String::new();
        let mut at = offset;
        for f in &released {
            out.push_str(&text[at..f.start]);
            out.push_str(&f.category.placeholder());
            at = f.end;
        }
        out.push_str(&text[at..cut]);
        self.findings.extend(released.into_iter().map(|f| Finding {
            start: f.start - offset,
            end: f.end - offset,
            ..f
        }));
        // Keep the released text's tail as context (from a character boundary).
        let mut from = cut.saturating_sub(HOLD);
        while !text.is_char_boundary(from) {
            from += 1;
        }
        self.context = text[from..cut].to_string();
        self.pending = text[cut..].to_string();
        out
    }

    /// Where the final part of `text` ends: before the last [`HOLD`] bytes, before a token
    /// still running at the end, before an unclosed private-key block, and never inside a
    /// finding.
    fn safe_cut(&self, text: &str, offset: usize, found: &[Finding]) -> usize {
        let len = text.len();
        // The last HOLD bytes of what the detectors see: characters that read as nothing are
        // not counted, so padding a value with them cannot push its start out of the hold.
        let mut seen = 0;
        let mut cut = len;
        for (at, c) in text.char_indices().rev() {
            if seen >= HOLD {
                break;
            }
            if !normalize::is_ignorable(c) {
                seen += c.len_utf8();
            }
            cut = at;
        }
        // Characters that read as ASCII ones (full-width forms, mathematical letters) count as
        // what they read as; hidden characters join what they sit between.
        let ascii_token = |c: char| c.is_ascii_alphanumeric() || "._~+/=-@%".contains(c);
        let token_char = |c: char| {
            ascii_token(c) || normalize::is_ignorable(c) || normalize::reads_as(c, ascii_token)
        };
        let run_start = text
            .char_indices()
            .rev()
            .take_while(|(_, c)| token_char(*c))
            .last()
            .map_or(len, |(i, _)| i);
        cut = cut.min(run_start);
        if let Some(begin) = text[offset..].rfind("-----BEGIN") {
            let begin = offset + begin;
            if !text[begin..].contains("-----END") {
                cut = cut.min(begin);
            }
        }
        // A value may begin anywhere in the held-back part; so may its context words.
        for f in found {
            if f.start < cut && cut < f.end {
                cut = f.start;
            }
        }
        // At most MAX_HOLD visible bytes are held, so hidden characters cannot push a value's
        // start out; and at most MAX_HELD_BYTES in all, which bounds the work of each push.
        let mut from = cut.max(offset).max(len.saturating_sub(MAX_HELD_BYTES));
        while !text.is_char_boundary(from) {
            from += 1;
        }
        let mut visible = 0;
        let mut earliest = len;
        for (at, c) in text[from..].char_indices().rev() {
            if !normalize::is_ignorable(c) {
                visible += c.len_utf8();
            }
            if visible > MAX_HOLD {
                break;
            }
            earliest = from + at;
        }
        cut = cut.max(earliest.min(len)).max(from);
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        cut.max(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partial_pattern_compiles() {
        assert_eq!(partial_values().len(), 13);
    }

    #[test]
    fn every_built_in_pattern_compiles() {
        assert_eq!(built_in().len(), Category::BUILT_IN.len());
        for (detector, category) in built_in().iter().zip(Category::BUILT_IN) {
            assert_eq!(detector.category, category);
        }
    }
}
