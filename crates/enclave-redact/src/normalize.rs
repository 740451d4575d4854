//! The text as the detectors see it: each character in NFKC (full-width digits and letters,
//! no-break spaces and the like become their ASCII forms) and default-ignorable characters
//! (zero-width spaces and joiners, soft hyphens, byte-order marks, variation selectors) left
//! out — so `１３８…` or `138​1234​5678` is the number it reads as — with a map back to the
//! original's byte offsets, so findings are replaced in the text as written.

use std::borrow::Cow;

use unicode_normalization::UnicodeNormalization;

/// A normalized text and, when it differs from the original, where each of its characters
/// came from.
pub(crate) struct Normalized<'a> {
    pub text: Cow<'a, str>,
    /// Per normalized character: (its byte offset here, the original character's start and
    /// end). Empty when the text is unchanged.
    map: Vec<(usize, usize, usize)>,
    original_len: usize,
}

/// Unicode's Default_Ignorable_Code_Point: characters that render as nothing, which an
/// attacker may put between the digits of a value.
pub(crate) fn is_ignorable(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}' | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

/// Whether `c` stays as it is: ASCII, and the common CJK ranges NFKC leaves alone (checked
/// first, so Chinese text costs no normalization).
fn stable(c: char) -> bool {
    c.is_ascii()
        || matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{3001}'..='\u{3002}')
}

fn changes(c: char) -> bool {
    !stable(c) && (is_ignorable(c) || !c.nfkc().eq(std::iter::once(c)))
}

impl<'a> Normalized<'a> {
    pub fn new(original: &'a str) -> Self {
        if !original.chars().any(changes) {
            return Self {
                text: Cow::Borrowed(original),
                map: Vec::new(),
                original_len: original.len(),
            };
        }
        let mut text = String::with_capacity(original.len());
        let mut map = Vec::with_capacity(original.len());
        for (start, c) in original.char_indices() {
            let end = start + c.len_utf8();
            if stable(c) {
                map.push((text.len(), start, end));
                text.push(c);
            } else if !is_ignorable(c) {
                for n in c.nfkc() {
                    map.push((text.len(), start, end));
                    text.push(n);
                }
            }
        }
        Self {
            text: Cow::Owned(text),
            map,
            original_len: original.len(),
        }
    }

    /// The normalized offset of the first character at or after original offset `at`.
    pub fn to_normalized(&self, at: usize) -> usize {
        if self.map.is_empty() {
            return at;
        }
        let i = self.map.partition_point(|&(_, start, _)| start < at);
        self.map.get(i).map_or(self.text.len(), |&(n, _, _)| n)
    }

    /// The original span of normalized `start..end` (character boundaries there): from the
    /// start of its first character's origin to the end of its last's.
    pub fn to_original(&self, start: usize, end: usize) -> (usize, usize) {
        if self.map.is_empty() {
            return (start, end);
        }
        let first = self.map.partition_point(|&(n, _, _)| n < start);
        let last = self.map.partition_point(|&(n, _, _)| n < end);
        let from = self.map.get(first).map_or(self.original_len, |m| m.1);
        let to = last
            .checked_sub(1)
            .and_then(|i| self.map.get(i))
            .map_or(from, |m| m.2);
        (from, to.max(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_width_and_hidden_characters_read_as_what_they_show() {
        let original = "手机１３８\u{200B}1234\u{FEFF}5678。";
        let n = Normalized::new(original);
        assert_eq!(n.text, "手机13812345678。");
        let start = n.text.find("138").unwrap();
        let (from, to) = n.to_original(start, start + 11);
        assert_eq!(&original[from..to], "１３８\u{200B}1234\u{FEFF}5678");
        assert_eq!(n.to_normalized(from), start);
    }

    #[test]
    fn plain_text_is_borrowed_and_maps_to_itself() {
        let n = Normalized::new("电话 13812345678");
        assert!(matches!(n.text, Cow::Borrowed(_)));
        assert_eq!(n.to_original(3, 7), (3, 7));
    }
}
