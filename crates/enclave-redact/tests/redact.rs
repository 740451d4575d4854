//! The detector on every category: valid values (check digits computed independently, or
//! published examples) caught with their exact span; near-misses — a wrong check digit, a
//! wrong length, a value inside a longer run of digits — left alone; mixed Chinese and English
//! text; values split across streamed chunks; and, as properties, that it never panics, never
//! changes a text it finds nothing in, and streams exactly what it redacts whole.

use std::sync::Arc;

use enclave_redact::{Category, Redactor};
use proptest::prelude::*;

/// (category, text, the value found in it).
const POSITIVES: &[(&str, &str, &str)] = &[
    ("id_card", "身份证号11010519491231002X。", "11010519491231002X"),
    ("id_card", "ID 44030419900307123x, ok", "44030419900307123x"),
    ("id_card", "id:110101198001010010", "110101198001010010"),
    ("mobile", "手机13812345678", "13812345678"),
    ("mobile", "call +86 138 1234 5678 now", "+86 138 1234 5678"),
    ("mobile", "tel 138-1234-5678.", "138-1234-5678"),
    ("landline", "电话010-62345678转", "010-62345678"),
    ("landline", "office (0755) 8765432", "(0755) 8765432"),
    ("bank_card", "card 4111 1111 1111 1111 exp", "4111 1111 1111 1111"),
    ("bank_card", "卡号6222020200112230，", "6222020200112230"),
    ("bank_card", "acct 622848001234567894", "622848001234567894"),
    ("email", "mail zhang.san@example.com.cn.", "zhang.san@example.com.cn"),
    ("email", "联系a_b+tag@mail.acme.io吧", "a_b+tag@mail.acme.io"),
    ("ipv4", "from 192.168.1.10:8080", "192.168.1.10"),
    ("ipv6", "addr 2001:db8::8a2e:370:7334 up", "2001:db8::8a2e:370:7334"),
    ("ipv6", "link fe80::1%eth0", "fe80::1"),
    ("passport", "护照号码E12345678", "E12345678"),
    ("passport", "passport G87654321.", "G87654321"),
    ("social_credit_code", "统一社会信用代码91350100M000100Y43", "91350100M000100Y43"),
    ("social_credit_code", "USCC 91110000600037341L", "91110000600037341L"),
    ("license_plate", "车牌京A12345停在", "京A12345"),
    ("license_plate", "粤B·D12345", "粤B·D12345"),
    ("license_plate", "沪AD12345", "沪AD12345"),
    ("vin", "VIN 1M8GDM9AXKP042788", "1M8GDM9AXKP042788"),
    ("vin", "车架号LSVNV2182E2100519", "LSVNV2182E2100519"),
    ("hong_kong_id", "HKID A123456(3)", "A123456(3)"),
    ("hong_kong_id", "香港身份证AB9876543", "AB9876543"),
    ("taiwan_id", "身分證 A123456789", "A123456789"),
    ("us_ssn", "SSN 123-45-6789.", "123-45-6789"),
    ("iban", "IBAN GB82 WEST 1234 5698 7654 32 please", "GB82 WEST 1234 5698 7654 32"),
    ("iban", "to DE89370400440532013000.", "DE89370400440532013000"),
    ("birth_date", "出生日期：1990年3月7日，", "1990年3月7日"),
    ("birth_date", "DOB: 07/03/1990", "07/03/1990"),
    ("birth_date", "date of birth 1985-12-31", "1985-12-31"),
    (
        "private_key",
        "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----\nend",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----",
    ),
    ("cloud_key", "aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
    ("cloud_key", "阿里云 LTAI5tFakeKeyForTest12 ", "LTAI5tFakeKeyForTest12"),
    (
        "cloud_key",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "bearer_token",
        "Authorization: Bearer abcdef0123456789abcdef",
        "abcdef0123456789abcdef",
    ),
    (
        "bearer_token",
        "token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl end",
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
    ),
];

/// (what, text): nothing may be found.
const NEAR_MISSES: &[(&str, &str)] = &[
    ("id card, wrong check", "身份证号110105194912310021。"),
    ("id card, 17 digits", "身份证号11010519491231002。"),
    (
        "id card, inside a longer run",
        "no 911010519491231002X7 here",
    ),
    ("id card, impossible date", "身份证号110105194913310029"),
    ("mobile, second digit 2", "手机12812345678"),
    ("mobile, 12 digits", "手机138123456789"),
    ("bank card, wrong Luhn", "card 4111 1111 1111 1112 exp"),
    (
        "bank card, inside a longer run",
        "ref 12344111111111111111999",
    ),
    ("email, no domain", "user@localhost"),
    ("ipv4, octet over 255", "from 256.168.1.10"),
    ("ipv4, five parts", "version 1.2.3.4.5"),
    ("ipv6 lookalike: a time", "at 12:30:45"),
    ("ipv6 lookalike: a Rust path", "use std::io::Read;"),
    ("social credit code, wrong check", "代码91350100M000100Y44"),
    ("vin, wrong check digit", "VIN 1M8GDM9A1KP042788"),
    ("vin, digits only", "no 12345678901234567"),
    ("hong kong id, wrong check", "HKID A123456(4)"),
    ("taiwan id, wrong check", "A123456788"),
    ("ssn, area 666", "SSN 666-45-6789"),
    ("ssn, group 00", "SSN 123-00-6789"),
    ("iban, wrong check", "GB82WEST12345698765433"),
    ("birth date without context", "meeting on 1990-03-07"),
    ("birth date, impossible", "出生日期：1990年2月30日"),
    ("plate with I", "京I12345"),
    ("passport inside a word", "XE12345678Y"),
];

#[test]
fn every_category_has_positive_examples_caught_exactly() {
    let redactor = Redactor::default();
    for category in Category::BUILT_IN {
        assert!(
            POSITIVES.iter().any(|(c, _, _)| *c == category.name()),
            "no example of {category}"
        );
    }
    assert!(Category::BUILT_IN.len() >= 18);
    for (category, text, value) in POSITIVES {
        let found = redactor.find(text);
        assert_eq!(found.len(), 1, "{category}: {text:?} → {found:?}");
        let f = &found[0];
        assert_eq!(f.category.name(), *category, "{text:?}");
        assert_eq!(&text[f.start..f.end], *value, "{category}: {text:?}");
        let redacted = redactor.redact(text).text;
        assert_eq!(
            redacted,
            text.replacen(value, &f.category.placeholder(), 1),
            "{category}"
        );
    }
}

#[test]
fn near_misses_are_left_alone() {
    let redactor = Redactor::default();
    for (what, text) in NEAR_MISSES {
        assert_eq!(redactor.find(text), vec![], "{what}: {text:?}");
        assert_eq!(redactor.redact(text).text, *text, "{what}");
    }
}

#[test]
fn mixed_chinese_and_english_text() {
    let redactor = Redactor::default();
    let text = "客户张三（DOB 1990-03-07），身份证11010519491231002X，手机+86 138 1234 5678，\
                email zhang.san@example.com.cn; paid with 4111-1111-1111-1111 from 10.0.0.8. \
                车牌粤B·D12345。Order no. 20240101123456 is not personal.";
    let redacted = redactor.redact(text);
    assert_eq!(
        redacted.text,
        "客户张三（DOB [BIRTH_DATE]），身份证[ID_CARD]，手机[MOBILE]，\
         email [EMAIL]; paid with [BANK_CARD] from [IPV4]. \
         车牌[LICENSE_PLATE]。Order no. 20240101123456 is not personal."
    );
    let categories: Vec<&str> = redacted
        .findings
        .iter()
        .map(|f| f.category.name())
        .collect();
    assert_eq!(
        categories,
        [
            "birth_date",
            "id_card",
            "mobile",
            "email",
            "bank_card",
            "ipv4",
            "license_plate"
        ]
    );
}

#[test]
fn custom_patterns_and_category_choice() {
    let redactor = Redactor::new(
        Some(&["email".to_string()]),
        &[("employee_id".to_string(), r"EMP-\d{6}".to_string())],
    )
    .unwrap();
    let redacted = redactor.redact("EMP-004211 (a@b.io, 13812345678)");
    assert_eq!(redacted.text, "[EMPLOYEE_ID] ([EMAIL], 13812345678)");
    assert!(Redactor::new(None, &[("x".into(), "(".into())]).is_err());
    assert!(Redactor::new(None, &[("Email".into(), "x".into())]).is_err());
    assert!(Redactor::new(None, &[("email".into(), "x".into())]).is_err());
    assert!(Redactor::new(Some(&["phone".to_string()]), &[]).is_err());
}

#[test]
fn values_split_across_chunks_are_redacted() {
    let redactor = Arc::new(Redactor::default());
    let chunks = [
        "您的身份证号是1101051949",
        "1231002X，手机138",
        "1234",
        "5678。Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIi",
        "OiJhbGljZSJ9.c2lnbmF0dXJl done",
    ];
    let mut stream = redactor.stream();
    let mut out = String::new();
    for chunk in chunks {
        let released = stream.push(chunk);
        assert!(!released.contains("1101051949"), "{released}");
        out.push_str(&released);
    }
    out.push_str(&stream.finish());
    assert_eq!(
        out,
        "您的身份证号是[ID_CARD]，手机[MOBILE]。Bearer [BEARER_TOKEN] done"
    );
    assert_eq!(out, redactor.redact(&chunks.concat()).text);
}

/// Texts made of ordinary words and sensitive values, for the properties.
fn mixed_text() -> impl Strategy<Value = String> {
    let pieces: Vec<String> = POSITIVES
        .iter()
        .map(|(_, text, _)| text.to_string())
        .chain(NEAR_MISSES.iter().map(|(_, text)| text.to_string()))
        .chain(
            [
                "的", " ", "，", "hello ", "数据", "\n", "1", "x", "2024", "-", "@", ":",
            ]
            .map(String::from),
        )
        .collect();
    prop::collection::vec(prop::sample::select(pieces), 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn never_panics_and_leaves_clean_text_alone(text in "\\PC{0,200}") {
        let redactor = Redactor::default();
        let redacted = redactor.redact(&text);
        if redacted.findings.is_empty() {
            prop_assert_eq!(&redacted.text, &text);
        }
        for f in &redacted.findings {
            prop_assert!(f.start < f.end && f.end <= text.len());
        }
    }

    #[test]
    fn streaming_any_split_equals_redacting_whole(
        text in mixed_text(),
        cuts in prop::collection::vec(0usize..400, 0..12),
    ) {
        let redactor = Arc::new(Redactor::default());
        let mut cuts: Vec<usize> = cuts
            .into_iter()
            .map(|c| c.min(text.len()))
            .filter(|c| text.is_char_boundary(*c))
            .collect();
        cuts.sort_unstable();
        let mut stream = redactor.stream();
        let mut out = String::new();
        let mut at = 0;
        for cut in cuts.into_iter().chain([text.len()]) {
            out.push_str(&stream.push(&text[at..cut]));
            at = cut;
        }
        out.push_str(&stream.finish());
        prop_assert_eq!(out, redactor.redact_ending(&text).text);
    }
}

#[test]
fn full_width_and_hidden_characters_do_not_hide_a_value() {
    let redactor = Arc::new(Redactor::default());
    for (text, redacted) in [
        (
            "身份证１１０１０５１９４９１２３１００２X",
            "身份证[ID_CARD]",
        ),
        ("手机１３８１２３４５６７８", "手机[MOBILE]"),
        (
            "card ４１１１ １１１１ １１１１ １１１１",
            "card [BANK_CARD]",
        ),
        // Zero-width spaces, joiners, a soft hyphen and a BOM between the digits.
        ("手机138\u{200B}1234\u{200D}5678。", "手机[MOBILE]。"),
        ("ID 1101\u{00AD}0519491231002X!", "ID [ID_CARD]!"),
        ("tel 1\u{FEFF}3\u{2060}8 1234 5678", "tel [MOBILE]"),
    ] {
        assert_eq!(redactor.redact(text).text, redacted, "{text}");
        // Streamed a character at a time, the same.
        let mut stream = redactor.stream();
        let mut out = String::new();
        for c in text.chars() {
            out.push_str(&stream.push(&c.to_string()));
        }
        out.push_str(&stream.finish());
        assert_eq!(out, redacted, "{text}");
    }
    // Padding a value with hundreds of hidden characters does not push its start out of what
    // the stream holds back.
    let padded: String = "手机13812345678"
        .chars()
        .flat_map(|c| std::iter::once(c).chain(std::iter::repeat_n('\u{200B}', 40)))
        .collect();
    let mut stream = redactor.stream();
    let mut out = String::new();
    for c in padded.chars() {
        out.push_str(&stream.push(&c.to_string()));
        assert!(!out.contains('3'), "released a digit: {out:?}");
    }
    out.push_str(&stream.finish());
    assert!(out.contains("[MOBILE]"));
    // Other scripts' digits are not ASCII digits after NFKC: left alone, never a panic.
    for text in ["٠١٢٣٤٥٦٧٨٩٠١٢٣", "१३८१२३४५६७८"] {
        assert_eq!(redactor.redact(text).text, text);
    }
}

#[test]
fn a_value_cut_short_at_the_end_of_a_completion_is_masked() {
    let redactor = Arc::new(Redactor::default());
    for (text, redacted) in [
        ("手机号是1381234567", "手机号是[MOBILE]"),
        ("身份证11010519491231002", "身份证[ID_CARD]"),
        ("card 4111 1111 1111 111", "card [BANK_CARD]"),
        ("key sk-proj-abcd1234", "key [CLOUD_KEY]"),
        ("write to alice@example", "write to [EMAIL]"),
        ("SSN 123-45-678", "SSN [US_SSN]"),
        ("passport E1234567", "passport [PASSPORT]"),
    ] {
        assert_eq!(redactor.redact_ending(text).text, redacted, "{text}");
        // Mid-text the same characters are not a value (nothing whole is there).
        let mid = format!("{text}, then more.");
        assert_eq!(redactor.redact(&mid).text, mid);
        let mut stream = redactor.stream();
        let mut out = stream.push(text);
        out.push_str(&stream.finish());
        assert_eq!(out, redacted, "{text}");
    }
    // After another value, a cut e-mail address is still found (its pattern has no edges).
    assert_eq!(
        redactor
            .redact_ending("电话13812345678-zhang.san@compa")
            .text,
        "电话[MOBILE][EMAIL]"
    );
    // A token written in mathematical letters is held whole in a stream, as ASCII would be.
    let jwt = format!("token 𝐞𝐲𝐉{}.eyJzdWIiOiIxIn0.sig done", "a".repeat(300));
    let mut stream = redactor.stream();
    let mut out = String::new();
    for c in jwt.chars() {
        out.push_str(&stream.push(&c.to_string()));
        assert!(!out.contains("aaaa"), "released part of the token: {out}");
    }
    out.push_str(&stream.finish());
    assert_eq!(out, redactor.redact(&jwt).text);
    // Ordinary numbers at the end stay: too short for any value, or a whole run that fails
    // its check (a near-miss, not a prefix).
    for text in [
        "the answer is 42",
        "in 2024",
        "population 14125000",
        "order 6222020200112231",
        "version 1.2.3",
    ] {
        assert_eq!(redactor.redact_ending(text).text, text, "{text}");
    }
    // A policy that masks only some categories masks only their prefixes.
    let phones = Redactor::new(Some(&["mobile".to_string()]), &[]).unwrap();
    assert_eq!(phones.redact_ending("card 4111 1111 1111 111").findings, []);
    assert_eq!(
        phones.redact_ending("call 1381234567").text,
        "call [MOBILE]"
    );
}

#[test]
fn a_private_key_cut_off_before_its_end_is_redacted_to_the_end() {
    let redactor = Arc::new(Redactor::default());
    let text =
        "here:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ";
    assert_eq!(redactor.redact(text).text, "here:\n[PRIVATE_KEY]");
    let mut stream = redactor.stream();
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(7) {
        out.push_str(&stream.push(std::str::from_utf8(chunk).unwrap()));
        assert!(!out.contains("b3Blbn"), "{out}");
    }
    out.push_str(&stream.finish());
    assert_eq!(out, "here:\n[PRIVATE_KEY]");
}
