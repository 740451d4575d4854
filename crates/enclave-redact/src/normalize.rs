//! The text as the detectors see it: each character in NFKC (full-width digits and letters,
//! no-break spaces and the like become their ASCII forms) and default-ignorable characters
//! (zero-width spaces and joiners, soft hyphens, byte-order marks, variation selectors) left
//! out — so `１３８…` or `138​1234​5678` is the number it reads as — with a map back to the
//! original's byte offsets, so findings are replaced in the text as written.

use std::borrow::Cow;

use unicode_normalization::UnicodeNormalization;

/// A normalized text and, when it differs from the original, where its changed characters
/// came from.
pub(crate) struct Normalized<'a> {
    pub text: Cow<'a, str>,
    /// Per changed original character, in order: (its normalized start and end here, its
    /// original start and end). Between two, offsets shift by a constant; an ignorable
    /// character has an empty normalized span. Empty when the text is unchanged.
    changed: Vec<Change>,
}

#[derive(Debug, Clone, Copy)]
struct Change {
    norm_start: usize,
    norm_end: usize,
    start: usize,
    end: usize,
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

/// Whether `c` surely stays as it is: ASCII, and the common CJK ranges NFKC leaves alone
/// (checked first, so Chinese text costs no normalization).
fn stable(c: char) -> bool {
    c.is_ascii()
        || matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{3001}'..='\u{3002}')
}

/// Whether `c` reads, after NFKC, as one character that `ascii` accepts (`Ｅ`, `𝐞`).
pub(crate) fn reads_as(c: char, ascii: impl Fn(char) -> bool) -> bool {
    if stable(c) {
        return false;
    }
    let mut n = c.nfkc();
    matches!((n.next(), n.next()), (Some(one), None) if one.is_ascii() && ascii(one))
}

impl<'a> Normalized<'a> {
    pub fn new(original: &'a str) -> Self {
        let mut text = String::new();
        let mut changed = Vec::new();
        // Original bytes up to here are in `text` (once it is in use).
        let mut copied = 0;
        for (start, c) in original.char_indices() {
            if stable(c) {
                continue;
            }
            let ignorable = is_ignorable(c);
            if !ignorable && c.nfkc().eq(std::iter::once(c)) {
                continue;
            }
            if changed.is_empty() {
                text.reserve(original.len());
            }
            text.push_str(&original[copied..start]);
            let norm_start = text.len();
            if !ignorable {
                text.extend(c.nfkc());
            }
            let end = start + c.len_utf8();
            changed.push(Change {
                norm_start,
                norm_end: text.len(),
                start,
                end,
            });
            copied = end;
        }
        if changed.is_empty() {
            return Self {
                text: Cow::Borrowed(original),
                changed,
            };
        }
        text.push_str(&original[copied..]);
        Self {
            text: Cow::Owned(text),
            changed,
        }
    }

    /// The normalized offset of the first character at or after original offset `at` (a
    /// character boundary).
    pub fn to_normalized(&self, at: usize) -> usize {
        let i = self.changed.partition_point(|c| c.end <= at);
        match self.changed.get(i) {
            Some(c) if c.start <= at => c.norm_start,
            _ => match i.checked_sub(1).and_then(|p| self.changed.get(p)) {
                Some(prev) => prev.norm_end + (at - prev.end),
                None => at,
            },
        }
    }

    /// The original span of normalized `start..end` (character boundaries there): from the
    /// start of its first character's origin to the end of its last's.
    pub fn to_original(&self, start: usize, end: usize) -> (usize, usize) {
        let i = self.changed.partition_point(|c| c.norm_end <= start);
        let from = match self.changed.get(i) {
            // Inside a changed character's expansion.
            Some(c) if c.norm_start <= start && start < c.norm_end => c.start,
            _ => match i.checked_sub(1).and_then(|p| self.changed.get(p)) {
                Some(prev) => prev.end + (start - prev.norm_end),
                None => start,
            },
        };
        let j = self.changed.partition_point(|c| c.norm_end < end);
        let to = match self.changed.get(j) {
            Some(c) if c.norm_start < end => c.end,
            _ => match j.checked_sub(1).and_then(|p| self.changed.get(p)) {
                Some(prev) => prev.end + (end - prev.norm_end),
                None => end,
            },
        };
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
    fn every_span_maps_back_to_the_characters_it_came_from() {
        let original = "a１\u{200B}b\u{FF0C}c½d\u{FEFF}";
        let n = Normalized::new(original);
        assert_eq!(n.text, "a1b,c1\u{2044}2d");
        // Each normalized character, back to its original character.
        let expect = ["a", "１", "b", "\u{FF0C}", "c", "½", "½", "½", "d"];
        for ((at, c), want) in n.text.char_indices().zip(expect) {
            let (from, to) = n.to_original(at, at + c.len_utf8());
            assert_eq!(&original[from..to], want, "{c:?} at {at}");
        }
        let (from, to) = n.to_original(0, n.text.len());
        assert_eq!(&original[from..to], "a１\u{200B}b\u{FF0C}c½d");
        for (at, c) in original.char_indices() {
            let back = n.to_normalized(at);
            assert!(n.text.is_char_boundary(back), "{c:?}");
        }
        assert_eq!(n.to_normalized(original.len()), n.text.len());
    }

    #[test]
    fn plain_text_is_borrowed_and_maps_to_itself() {
        let n = Normalized::new("电话 13812345678");
        assert!(matches!(n.text, Cow::Borrowed(_)));
        assert_eq!(n.to_original(3, 7), (3, 7));
    }
}
