//! DeepSeek-R1 reasoning output: the text up to `</think>` is `reasoning_content`, the rest is
//! `content`, exactly as DeepSeek's API returns it.
//!
//! The reasoning either begins because the chat template opened `<think>` in the generation
//! prompt, or because the output itself starts with `<think>` (leading whitespace allowed).
//! Text arrives in deltas, so a tag split across deltas is held back until it is decided.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not yet known whether the output opens with `<think>`.
    Undecided,
    Reasoning,
    Content,
}

/// Splits a stream of text deltas into reasoning and content.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    phase: Phase,
    held: String,
    saw_reasoning: bool,
}

/// What one delta contributes to each part (either may be empty).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl ReasoningSplitter {
    /// `opened`: the prompt already opened `<think>`, so the output starts as reasoning.
    pub fn new(opened: bool) -> Self {
        Self {
            phase: if opened {
                Phase::Reasoning
            } else {
                Phase::Undecided
            },
            held: String::new(),
            saw_reasoning: opened,
        }
    }

    /// Whether the output has a reasoning part (known once it opened `<think>` or after
    /// [`Self::finish`]); a model that never opens `<think>` has plain content only.
    pub fn is_reasoning(&self) -> bool {
        self.saw_reasoning
    }

    pub fn push(&mut self, delta: &str) -> Split {
        self.held.push_str(delta);
        let mut out = Split::default();
        loop {
            match self.phase {
                Phase::Undecided => {
                    let trimmed = self.held.trim_start();
                    if trimmed.starts_with(OPEN) {
                        let at = self.held.len() - trimmed.len() + OPEN.len();
                        self.held.drain(..at);
                        self.phase = Phase::Reasoning;
                        self.saw_reasoning = true;
                    } else if OPEN.starts_with(trimmed) {
                        return out; // still may become `<think>`
                    } else {
                        self.phase = Phase::Content;
                    }
                }
                Phase::Reasoning => {
                    if let Some(at) = self.held.find(CLOSE) {
                        out.reasoning.push_str(&self.held[..at]);
                        self.held.drain(..at + CLOSE.len());
                        self.phase = Phase::Content;
                    } else {
                        let keep = partial_suffix_len(&self.held, CLOSE);
                        let emit = self.held.len() - keep;
                        out.reasoning.push_str(&self.held[..emit]);
                        self.held.drain(..emit);
                        return out;
                    }
                }
                Phase::Content => {
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// Releases what is held back at the end of the output.
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.phase {
            Phase::Reasoning => Split {
                reasoning: held,
                content: String::new(),
            },
            Phase::Undecided | Phase::Content => {
                self.phase = Phase::Content;
                Split {
                    reasoning: String::new(),
                    content: held,
                }
            }
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix_len(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(opened: bool, deltas: &[&str]) -> (String, String, bool) {
        let mut s = ReasoningSplitter::new(opened);
        let mut reasoning = String::new();
        let mut content = String::new();
        for d in deltas {
            let part = s.push(d);
            reasoning += &part.reasoning;
            content += &part.content;
        }
        let part = s.finish();
        reasoning += &part.reasoning;
        content += &part.content;
        (reasoning, content, s.is_reasoning())
    }

    #[test]
    fn opened_by_the_template() {
        let (r, c, is) = split_all(true, &["Let me ", "think.</think>", "\n\nThe answer."]);
        assert_eq!(
            (r.as_str(), c.as_str(), is),
            ("Let me think.", "\n\nThe answer.", true)
        );
    }

    #[test]
    fn tags_split_across_deltas() {
        let deltas = ["  <thi", "nk>a<", "/th", "ink", ">b", "c"];
        assert_eq!(
            split_all(false, &deltas),
            ("a".to_string(), "bc".to_string(), true)
        );
        // Every possible split point of one text gives the same answer.
        let text = "<think>x < y </thin </think>done";
        for cut in 0..=text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(
                split_all(false, &[a, b]),
                ("x < y </thin ".to_string(), "done".to_string(), true),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn plain_output_is_all_content() {
        assert_eq!(
            split_all(false, &["<b>bold</b>"]),
            (String::new(), "<b>bold</b>".to_string(), false)
        );
        assert_eq!(
            split_all(false, &["<th"]),
            (String::new(), "<th".to_string(), false)
        );
    }

    #[test]
    fn unfinished_reasoning_stays_reasoning() {
        assert_eq!(
            split_all(true, &["still thinking </thi"]),
            ("still thinking </thi".to_string(), String::new(), true)
        );
    }
}
