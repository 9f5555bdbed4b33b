//! Stop conditions for one sequence: EOS / stop token ids, stop strings and the token budget.
//!
//! Stop strings are matched on detokenised text and may span several tokens, so text that could
//! still turn out to be the start of a stop string is held back until it is known not to be.
//! Everything emitted is therefore final: a stop string can never begin inside text that was
//! already released, and the stop string itself (and anything after it) is never emitted.

/// Why generation of a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// An end-of-sequence token id was generated.
    Eos,
    /// One of the configured stop token ids was generated.
    StopToken,
    /// A stop string appeared in the output text.
    StopString,
    /// The request was cancelled by the caller (never produced by [`StopChecker`] itself).
    Cancelled,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopCriteria {
    /// Token budget; the token that reaches it is still emitted. With 0, the first token stops.
    pub max_new_tokens: usize,
    pub eos_ids: Vec<u32>,
    pub stop_token_ids: Vec<u32>,
    /// Empty strings are ignored.
    pub stop_strings: Vec<String>,
}

/// The outcome of one [`StopChecker::push`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is final and safe to send to the client now (may be empty).
    pub text: String,
    /// Set when generation must stop after this token.
    pub finish: Option<FinishReason>,
}

#[derive(Debug, Clone)]
pub struct StopChecker {
    criteria: StopCriteria,
    generated: usize,
    /// Text not yet emitted: always a (possibly empty) proper prefix of some stop string, plus
    /// whatever the current delta added before it is resolved.
    held: String,
    finished: Option<FinishReason>,
}

impl StopChecker {
    pub fn new(mut criteria: StopCriteria) -> Self {
        criteria.stop_strings.retain(|s| !s.is_empty());
        Self {
            criteria,
            generated: 0,
            held: String::new(),
            finished: None,
        }
    }

    /// Called once per generated token with its id and the text delta the detokenizer released
    /// for it (may be empty). Returns the text safe to emit now and, if generation must stop,
    /// why.
    ///
    /// Precedence within one token: EOS, then stop token id (their text is never emitted), then
    /// stop string, then length. Generation stops at the first token whose text completes any
    /// stop string; among the stop strings present then, the earliest-starting one wins (a
    /// longer stop string that would start earlier but is not complete yet does not). On any stop other than a stop string, the held-back text is
    /// released in the returned step (nothing more can complete a stop string), so a later
    /// [`flush`](Self::flush) returns nothing. After a stop, further pushes are ignored and
    /// repeat the reason with no text.
    pub fn push(&mut self, token: u32, delta: &str) -> StopStep {
        if let Some(reason) = self.finished {
            return StopStep {
                text: String::new(),
                finish: Some(reason),
            };
        }
        self.generated += 1;

        if self.criteria.eos_ids.contains(&token) {
            return self.stop(FinishReason::Eos);
        }
        if self.criteria.stop_token_ids.contains(&token) {
            return self.stop(FinishReason::StopToken);
        }

        self.held.push_str(delta);
        if let Some(pos) = self.earliest_stop_string() {
            self.held.truncate(pos);
            return self.stop(FinishReason::StopString);
        }
        if self.generated >= self.criteria.max_new_tokens {
            return self.stop(FinishReason::Length);
        }

        let keep = self.partial_stop_suffix_len();
        let rest = self.held.split_off(self.held.len() - keep);
        StopStep {
            text: std::mem::replace(&mut self.held, rest),
            finish: None,
        }
    }

    /// The held-back text that turned out not to be a stop string; call at the end (e.g. on
    /// cancel). Empty after a stop reported by `push`.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The reason reported by `push`, once it has stopped.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Tokens pushed so far (including a terminating EOS / stop token).
    pub fn generated(&self) -> usize {
        self.generated
    }

    fn stop(&mut self, reason: FinishReason) -> StopStep {
        self.finished = Some(reason);
        StopStep {
            text: std::mem::take(&mut self.held),
            finish: Some(reason),
        }
    }

    /// Byte offset in `held` of the earliest stop-string match. Matches cannot start in text
    /// already emitted, so searching only `held` (short) is enough.
    fn earliest_stop_string(&self) -> Option<usize> {
        self.criteria
            .stop_strings
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string (and so
    /// might still grow into one). Prefixes are cut at char boundaries, so the split is valid.
    fn partial_stop_suffix_len(&self) -> usize {
        let mut best = 0;
        for s in &self.criteria.stop_strings {
            let longest = (1..s.len().min(self.held.len() + 1))
                .rev()
                .filter(|&k| k > best && s.is_char_boundary(k))
                .find(|&k| self.held.ends_with(&s[..k]));
            if let Some(k) = longest {
                best = k;
            }
        }
        best
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn checker(stops: &[&str], max_new_tokens: usize) -> StopChecker {
        StopChecker::new(StopCriteria {
            max_new_tokens,
            eos_ids: vec![2],
            stop_token_ids: vec![7, 8],
            stop_strings: stops.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Feeds `deltas` as tokens 100, 101, …; returns (emitted text incl. flush, finish).
    fn run(c: &mut StopChecker, deltas: &[&str]) -> (String, Option<FinishReason>) {
        let mut out = String::new();
        for (i, d) in deltas.iter().enumerate() {
            let step = c.push(100 + i as u32, d);
            out.push_str(&step.text);
            if step.finish.is_some() {
                out.push_str(&c.flush());
                return (out, step.finish);
            }
        }
        out.push_str(&c.flush());
        (out, None)
    }

    #[test]
    fn stop_string_across_token_boundaries() {
        let mut c = checker(&["o W"], 100);
        let s1 = c.push(100, "Hel");
        assert_eq!(s1.text, "Hel");
        assert_eq!(s1.finish, None);
        let s2 = c.push(101, "lo Wor");
        assert_eq!(s2.text, "l");
        assert_eq!(s2.finish, Some(FinishReason::StopString));
        assert_eq!(c.flush(), "");
        // Ignored after stopping.
        assert_eq!(c.push(102, "ld").text, "");

        let mut c = checker(&["o W"], 100);
        assert_eq!(
            run(&mut c, &["Hel", "lo", " ", "Wor", "ld"]),
            ("Hell".to_string(), Some(FinishReason::StopString))
        );
    }

    #[test]
    fn held_partial_prefix_released_when_it_diverges() {
        let mut c = checker(&["world"], 100);
        let s = c.push(100, "hello wo");
        assert_eq!(s.text, "hello ");
        let s = c.push(101, "r");
        assert_eq!(s.text, "");
        let s = c.push(102, "m!");
        assert_eq!(s.text, "worm!");
        assert_eq!(s.finish, None);
        // A held prefix is released by flush at the end.
        let s = c.push(103, " wor");
        assert_eq!(s.text, " ");
        assert_eq!(c.flush(), "wor");
    }

    #[test]
    fn earliest_stop_string_wins() {
        let mut c = checker(&["cd", "bc", "abcdef"], 100);
        assert_eq!(
            run(&mut c, &["xa", "bcdefg"]),
            ("x".to_string(), Some(FinishReason::StopString))
        );
        // Overlapping prefixes of several stop strings: hold the longest.
        let mut c = checker(&["abx", "bcd"], 100);
        let s = c.push(100, "zab");
        assert_eq!(s.text, "z");
        let s = c.push(101, "c");
        assert_eq!(s.text, "a");
        let s = c.push(102, "d");
        assert_eq!(
            (s.text.as_str(), s.finish),
            ("", Some(FinishReason::StopString))
        );
    }

    #[test]
    fn eos_and_stop_ids_are_not_emitted_and_release_held_text() {
        let mut c = checker(&["###"], 100);
        assert_eq!(c.push(100, "answer #").text, "answer ");
        let s = c.push(2, "</s>");
        assert_eq!(s.text, "#");
        assert_eq!(s.finish, Some(FinishReason::Eos));
        assert_eq!(c.finish_reason(), Some(FinishReason::Eos));
        assert_eq!(c.flush(), "");

        let mut c = checker(&[], 100);
        assert_eq!(c.push(100, "a").text, "a");
        let s = c.push(8, "<|im_end|>");
        assert_eq!(
            s,
            StopStep {
                text: String::new(),
                finish: Some(FinishReason::StopToken)
            }
        );
        assert_eq!(c.generated(), 2);
    }

    #[test]
    fn length_emits_last_token_text() {
        let mut c = checker(&["stop"], 3);
        assert_eq!(c.push(100, "a ").finish, None);
        assert_eq!(c.push(101, "b ").finish, None);
        let s = c.push(102, "st");
        assert_eq!(s.text, "st");
        assert_eq!(s.finish, Some(FinishReason::Length));
        // A stop string completed by the last token still takes precedence.
        let mut c = checker(&["stop"], 2);
        c.push(100, "st");
        let s = c.push(101, "op");
        assert_eq!(s.finish, Some(FinishReason::StopString));
        assert_eq!(s.text, "");
    }

    #[test]
    fn multibyte_partial_prefixes() {
        let mut c = checker(&["édé"], 100);
        let s = c.push(100, "café");
        assert_eq!(s.text, "caf");
        let s = c.push(101, "d");
        assert_eq!(s.text, "");
        let s = c.push(102, "x");
        assert_eq!(s.text, "édx");
        let s = c.push(103, "€édé");
        assert_eq!(
            (s.text.as_str(), s.finish),
            ("€", Some(FinishReason::StopString))
        );
    }

    /// For any split of a text into deltas, the emitted text is the text up to the earliest match
    /// among the stop strings complete at the first token where any is (generation stops then;
    /// a longer stop string that starts earlier but would only complete later cannot win).
    #[test]
    fn emitted_text_is_full_text_before_first_stop() {
        let texts = [
            "The quick brown fox jumps over the lazy dog.\n\nUser: hi",
            "abababababc aab abc",
            "naïve café — 日本語のテキスト 😀 end",
            "no stop here at all",
            "User",
        ];
        let stops: &[&str] = &["\n\nUser:", "abc", "テキ", "😀", "User", "ab ab"];
        let mut rng = StdRng::seed_from_u64(3);
        for text in texts {
            let boundaries: Vec<usize> = (1..text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            for _ in 0..300 {
                let mut cuts: Vec<usize> = boundaries
                    .iter()
                    .copied()
                    .filter(|_| rng.random::<f32>() < 0.3)
                    .collect();
                cuts.insert(0, 0);
                cuts.push(text.len());
                // Reference: scan the growing text after each delta.
                let expected_cut = cuts[1..]
                    .iter()
                    .find_map(|&end| stops.iter().filter_map(|s| text[..end].find(s)).min());
                let expected = &text[..expected_cut.unwrap_or(text.len())];
                let deltas: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
                let mut c = checker(stops, 10_000);
                let mut out = String::new();
                let mut finish = None;
                for (i, d) in deltas.iter().enumerate() {
                    let step = c.push(100 + i as u32, d);
                    // Nothing emitted ever runs past the expected prefix.
                    out.push_str(&step.text);
                    assert!(expected.starts_with(&out), "{out:?} vs {expected:?}");
                    if step.finish.is_some() {
                        finish = step.finish;
                        break;
                    }
                }
                out.push_str(&c.flush());
                assert_eq!(out, expected, "deltas {deltas:?}");
                let want = expected_cut.map(|_| FinishReason::StopString);
                assert_eq!(finish, want);
            }
        }
    }
}
