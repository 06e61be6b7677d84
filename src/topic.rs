//! Topic rules: validation, wildcard matching and the per-core subscription index.
//!
//! A topic is 1 to `max_topic_length` bytes of ASCII letters, digits and `_ - : @`, split by `.`
//! into non-empty segments, and is case sensitive. Subscriptions may use patterns:
//!
//! - `*` as a whole segment matches exactly one segment, so `orders.*.created` matches
//!   `orders.eu.created` but not `orders.created`.
//! - `>` as the last segment matches one or more trailing segments, so `orders.>` matches
//!   `orders.created` and `orders.eu.created` but not `orders`.
//!
//! Every core owns one [`SubscriptionIndex`] for the connections pinned to it, so the index is
//! neither shared nor locked. The cluster link subscribes to Redis with [`redis_glob`], which
//! matches a superset of a pattern, and filters what Redis delivers with [`matches()`].

use std::ops::ControlFlow;

/// Protocol error code for a topic that breaks the topic rules.
const INVALID_TOPIC: &str = "invalid_topic";

/// Protocol error code for a topic longer than `max_topic_length` bytes.
const TOPIC_TOO_LONG: &str = "topic_too_long";

/// Protocol error code for a PUBLISH to a pattern.
const WILDCARD_PUBLISH: &str = "wildcard_publish";

/// A topic or pattern that breaks the topic rules, named for the rule it breaks.
///
/// Segment numbers count from 1 and byte offsets from 0, as the error messages show them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The topic is the empty string.
    #[error("topic is empty")]
    Empty,

    /// The topic is longer than the configured maximum, in bytes.
    #[error("topic is {len} bytes long, more than the maximum of {max} bytes")]
    TooLong {
        /// Length of the topic in bytes.
        len: usize,
        /// Maximum length in bytes (`max_topic_length`).
        max: usize,
    },

    /// A segment is empty, because the topic starts or ends with `.` or contains `..`.
    #[error("topic segment {segment} is empty")]
    EmptySegment {
        /// Number of the empty segment, counting from 1.
        segment: usize,
    },

    /// A character outside ASCII letters, digits, `_ - : @` and the `.` separator.
    #[error(
        "topic contains the invalid character {character:?} at byte {offset}, but only ASCII \
         letters, digits, `_`, `-`, `:`, `@` and `.` between segments are allowed"
    )]
    InvalidCharacter {
        /// The rejected character.
        character: char,
        /// Byte offset of the character in the topic, counting from 0.
        offset: usize,
    },

    /// A segment contains `*` or `>` next to other characters, as in `ord*`.
    #[error(
        "topic segment {segment} contains `*` or `>` next to other characters, but a wildcard \
         must be a whole segment"
    )]
    WildcardInsideSegment {
        /// Number of the segment, counting from 1.
        segment: usize,
    },

    /// A pattern has `>` before its last segment.
    #[error("topic segment {segment} is `>`, which is allowed only as the last segment")]
    TailWildcardNotLast {
        /// Number of the `>` segment, counting from 1.
        segment: usize,
    },

    /// A PUBLISH topic has a `*` or `>` segment, but messages go to concrete topics only.
    #[error("topic segment {segment} is a wildcard, but PUBLISH needs a concrete topic")]
    Wildcard {
        /// Number of the wildcard segment, counting from 1.
        segment: usize,
    },
}

impl TopicError {
    /// Returns the protocol error code sent to the client: `topic_too_long`,
    /// `wildcard_publish` or, for every other rule, `invalid_topic`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLong { .. } => TOPIC_TOO_LONG,
            Self::Wildcard { .. } => WILDCARD_PUBLISH,
            Self::Empty
            | Self::EmptySegment { .. }
            | Self::InvalidCharacter { .. }
            | Self::WildcardInsideSegment { .. }
            | Self::TailWildcardNotLast { .. } => INVALID_TOPIC,
        }
    }
}

/// Kind of a valid subscription pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternKind {
    /// No wildcard segment: the pattern matches only the topic spelled the same.
    Exact,
    /// At least one `*` or `>` segment.
    Wildcard,
}

/// Request a topic appears in, which decides whether wildcard segments are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Usage {
    Publish,
    Subscribe,
}

/// Checks a PUBLISH topic against the topic rules.
///
/// A segment that is exactly `*` or `>` gives [`TopicError::Wildcard`]. A wildcard inside a
/// segment (`ord*`) breaks the character rules of every topic and gives
/// [`TopicError::WildcardInsideSegment`]. When a topic breaks several rules, the error names the
/// first one met: emptiness, then length, then segments from left to right.
pub fn validate_topic(topic: &str, max_len: usize) -> Result<(), TopicError> {
    check(topic, max_len, Usage::Publish).map(|_| ())
}

/// Checks a SUBSCRIBE or UNSUBSCRIBE pattern against the topic rules and returns its kind.
///
/// `*` may be any whole segment and `>` only the last one. Errors are reported in the same order
/// as by [`validate_topic`].
pub fn validate_pattern(pattern: &str, max_len: usize) -> Result<PatternKind, TopicError> {
    check(pattern, max_len, Usage::Subscribe)
}

fn check(text: &str, max_len: usize, usage: Usage) -> Result<PatternKind, TopicError> {
    if text.is_empty() {
        return Err(TopicError::Empty);
    }
    // Length first, so that a long topic is rejected without scanning it.
    if text.len() > max_len {
        return Err(TopicError::TooLong {
            len: text.len(),
            max: max_len,
        });
    }

    let mut kind = PatternKind::Exact;
    let mut offset = 0;
    for (index, segment) in text.split('.').enumerate() {
        let is_last = offset + segment.len() == text.len();
        if check_segment(text, segment, index + 1, offset, is_last, usage)? {
            kind = PatternKind::Wildcard;
        }
        offset += segment.len() + 1;
    }
    Ok(kind)
}

/// Checks one segment that starts at byte `offset` of `text` and returns whether it is a
/// wildcard.
fn check_segment(
    text: &str,
    segment: &str,
    number: usize,
    offset: usize,
    is_last: bool,
    usage: Usage,
) -> Result<bool, TopicError> {
    match segment {
        "" => Err(TopicError::EmptySegment { segment: number }),
        "*" | ">" if usage == Usage::Publish => Err(TopicError::Wildcard { segment: number }),
        "*" => Ok(true),
        ">" if is_last => Ok(true),
        ">" => Err(TopicError::TailWildcardNotLast { segment: number }),
        _ => check_literal(text, segment, number, offset).map(|()| false),
    }
}

/// Checks the characters of a segment that is not a wildcard.
fn check_literal(
    text: &str,
    segment: &str,
    number: usize,
    offset: usize,
) -> Result<(), TopicError> {
    let Some(position) = segment.bytes().position(|byte| !is_topic_byte(byte)) else {
        return Ok(());
    };

    let byte = segment.as_bytes()[position];
    if byte == b'*' || byte == b'>' {
        return Err(TopicError::WildcardInsideSegment { segment: number });
    }

    // Every byte before this one is ASCII, so the offset starts a character. The fallback
    // only guards against a broken invariant.
    let at = offset + position;
    let character = text
        .get(at..)
        .and_then(|rest| rest.chars().next())
        .unwrap_or(char::REPLACEMENT_CHARACTER);
    Err(TopicError::InvalidCharacter {
        character,
        offset: at,
    })
}

/// Returns whether `byte` may appear in a topic segment.
fn is_topic_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b':' | b'@')
}

/// Builds the Redis `PSUBSCRIBE` glob for the channels of `pattern` under `prefix`.
///
/// Both `*` and `>` segments become the Redis `*`, which matches any run of characters dots
/// included, so the glob matches a superset of the pattern: `prefix` + `orders.*` also matches
/// the channel of `orders.eu.created`. Filter each delivery with [`matches()`]. Valid topics
/// contain no Redis glob metacharacters, but `*`, `?`, `[`, `]` and `\` in `prefix` and in
/// literal segments are escaped with `\` all the same.
pub fn redis_glob(prefix: &str, pattern: &str) -> String {
    let mut glob = String::with_capacity(prefix.len() + pattern.len() + 8);
    push_escaped(&mut glob, prefix);

    for (index, segment) in pattern.split('.').enumerate() {
        if index > 0 {
            glob.push('.');
        }
        match segment {
            "*" | ">" => glob.push('*'),
            literal => push_escaped(&mut glob, literal),
        }
    }
    glob
}

fn push_escaped(glob: &mut String, literal: &str) {
    for character in literal.chars() {
        if matches!(character, '*' | '?' | '[' | ']' | '\\') {
            glob.push('\\');
        }
        glob.push(character);
    }
}

/// Returns whether the subscription `pattern` matches the published `topic`.
///
/// Both are expected to be valid (see [`validate_pattern`] and [`validate_topic`]). Literal
/// segments compare byte for byte, `*` matches one non-empty segment and a final `>` matches
/// one or more segments, so no pattern matches the empty topic.
pub fn matches(pattern: &str, topic: &str) -> bool {
    let mut topic_segments = topic.split('.');
    for pattern_segment in pattern.split('.') {
        if pattern_segment == ">" {
            return topic_segments
                .next()
                .is_some_and(|segment| !segment.is_empty());
        }
        let Some(topic_segment) = topic_segments.next() else {
            return false;
        };
        let segment_matches = if pattern_segment == "*" {
            !topic_segment.is_empty()
        } else {
            pattern_segment == topic_segment
        };
        if !segment_matches {
            return false;
        }
    }
    topic_segments.next().is_none()
}

/// Splits off the first segment of a topic. The rest is `None` after the last segment.
fn split_first_segment(text: &str) -> (&str, Option<&str>) {
    match text.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (text, None),
    }
}

/// Hash map with the foldhash hasher, which is faster than SipHash on short keys such as
/// topic segments. Each map gets its own random seed.
type FastMap<K, V> = foldhash::HashMap<K, V>;

/// Outcome of [`SubscriptionIndex::insert`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insertion {
    /// The pattern already held this value, so nothing changed.
    AlreadyPresent,
    /// The value was added to a pattern that already had other values.
    Added,
    /// The value is the first for its pattern on this index, so the core now needs the
    /// pattern's messages from the cluster link.
    FirstForPattern,
}

impl Insertion {
    /// Returns whether the insert added the value.
    pub fn is_added(self) -> bool {
        self != Self::AlreadyPresent
    }
}

/// Outcome of [`SubscriptionIndex::remove`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The pattern did not hold this value, so nothing changed.
    NotPresent,
    /// The value was removed and the pattern still has other values.
    Removed,
    /// The value was the last of its pattern on this index, so the core no longer needs the
    /// pattern's messages from the cluster link.
    LastForPattern,
}

impl Removal {
    /// Returns whether the remove took the value out.
    pub fn is_removed(self) -> bool {
        self != Self::NotPresent
    }
}

/// Subscription index for one core: exact topics in a hash map, wildcard patterns in a trie
/// keyed by segment.
///
/// Values are usually connection ids. Matching a topic costs one hash lookup for the exact
/// topics plus, for the wildcard patterns, at most one lookup per trie node on a matching path,
/// never a scan of all patterns, and it does not allocate.
///
/// NOTE: the values of one pattern sit in a `Vec`, so insert and remove take time linear in
/// the number of values that pattern has on this core. A pattern with a very large number of
/// subscribers on one core would want a set instead.
#[derive(Debug)]
pub struct SubscriptionIndex<V> {
    /// Values of patterns without wildcards, by topic.
    exact: FastMap<Box<str>, Vec<V>>,
    /// Root of the trie of wildcard patterns.
    root: Node<V>,
    /// Number of patterns, exact and wildcard, that have at least one value.
    pattern_count: usize,
}

/// Trie node for the wildcard patterns whose leading segments spell the path to this node.
#[derive(Debug)]
struct Node<V> {
    /// Children for literal segments.
    children: FastMap<Box<str>, Node<V>>,
    /// Child for a `*` segment.
    any_segment: Option<Box<Node<V>>>,
    /// Values of the patterns that end at this node.
    values: Vec<V>,
    /// Values of the patterns that end with `>` after this node's path.
    tail_values: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            children: FastMap::default(),
            any_segment: None,
            values: Vec::new(),
            tail_values: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.tail_values.is_empty()
            && self.any_segment.is_none()
            && self.children.is_empty()
    }
}

impl<V> Default for SubscriptionIndex<V> {
    fn default() -> Self {
        Self {
            exact: FastMap::default(),
            root: Node::default(),
            pattern_count: 0,
        }
    }
}

impl<V: PartialEq + Copy> SubscriptionIndex<V> {
    /// Creates an empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `value` to the subscribers of `pattern`, which must have passed
    /// [`validate_pattern`].
    pub fn insert(&mut self, pattern: &str, value: V) -> Insertion {
        debug_assert!(
            validate_pattern(pattern, usize::MAX).is_ok(),
            "invalid pattern {pattern:?}"
        );

        let values = if is_exact(pattern) {
            self.exact.entry(Box::from(pattern)).or_default()
        } else {
            trie_values_mut(&mut self.root, pattern)
        };
        if values.contains(&value) {
            return Insertion::AlreadyPresent;
        }

        values.push(value);
        if values.len() > 1 {
            return Insertion::Added;
        }
        self.pattern_count += 1;
        Insertion::FirstForPattern
    }

    /// Removes `value` from the subscribers of `pattern`, compared as the same string it was
    /// inserted with. Map entries and trie nodes left without values are freed.
    pub fn remove(&mut self, pattern: &str, value: V) -> Removal {
        let removal = if is_exact(pattern) {
            remove_exact(&mut self.exact, pattern, value)
        } else {
            remove_from_trie(&mut self.root, pattern, value)
        };
        if removal == Removal::LastForPattern {
            self.pattern_count -= 1;
        }
        removal
    }

    /// Calls `f` with every value whose pattern matches `topic`.
    ///
    /// A value inserted under several matching patterns is passed once for each of them, so
    /// callers that deliver once per connection must deduplicate. The order is unspecified.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(V)) {
        let _ = self.visit_matches(topic, |values| {
            values.iter().copied().for_each(&mut f);
            ControlFlow::Continue(())
        });
    }

    /// Returns whether any pattern in the index matches `topic`.
    pub fn has_match(&self, topic: &str) -> bool {
        self.visit_matches(topic, |_| ControlFlow::Break(()))
            .is_break()
    }

    /// Returns the number of distinct patterns that have at least one value.
    pub fn pattern_count(&self) -> usize {
        self.pattern_count
    }

    /// Calls `visit` with each non-empty list of values whose pattern matches `topic`, until it
    /// breaks.
    fn visit_matches(
        &self,
        topic: &str,
        mut visit: impl FnMut(&[V]) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        if let Some(values) = self.exact.get(topic) {
            visit(values)?;
        }
        visit_trie(&self.root, topic, &mut visit)
    }
}

/// Returns whether `pattern` has no wildcard segment. The pattern is trusted to be valid.
fn is_exact(pattern: &str) -> bool {
    pattern
        .split('.')
        .all(|segment| segment != "*" && segment != ">")
}

/// Returns the value list of a wildcard pattern, creating the trie nodes on its path.
fn trie_values_mut<'a, V>(root: &'a mut Node<V>, pattern: &str) -> &'a mut Vec<V> {
    let mut node = root;
    let mut rest = pattern;
    loop {
        let (segment, remainder) = split_first_segment(rest);
        if segment == ">" && remainder.is_none() {
            return &mut node.tail_values;
        }

        node = match segment {
            "*" => node.any_segment.get_or_insert_with(Box::default),
            literal => node.children.entry(Box::from(literal)).or_default(),
        };
        match remainder {
            Some(remainder) => rest = remainder,
            None => return &mut node.values,
        }
    }
}

fn remove_exact<V: PartialEq>(
    exact: &mut FastMap<Box<str>, Vec<V>>,
    topic: &str,
    value: V,
) -> Removal {
    let Some(values) = exact.get_mut(topic) else {
        return Removal::NotPresent;
    };
    let removal = remove_value(values, value);
    if values.is_empty() {
        exact.remove(topic);
    }
    removal
}

/// Removes `value` from the pattern `rest` below `node`, freeing each node on the way back up
/// that is left empty. The caller keeps the root even when it is empty.
fn remove_from_trie<V: PartialEq>(node: &mut Node<V>, rest: &str, value: V) -> Removal {
    let (segment, remainder) = split_first_segment(rest);
    if segment == ">" && remainder.is_none() {
        return remove_value(&mut node.tail_values, value);
    }

    let child = match segment {
        "*" => node.any_segment.as_deref_mut(),
        literal => node.children.get_mut(literal),
    };
    let Some(child) = child else {
        return Removal::NotPresent;
    };
    let removal = match remainder {
        Some(remainder) => remove_from_trie(child, remainder, value),
        None => remove_value(&mut child.values, value),
    };

    if child.is_empty() {
        match segment {
            "*" => node.any_segment = None,
            literal => {
                node.children.remove(literal);
            }
        }
    }
    removal
}

fn remove_value<V: PartialEq>(values: &mut Vec<V>, value: V) -> Removal {
    let Some(position) = values.iter().position(|held| *held == value) else {
        return Removal::NotPresent;
    };
    values.swap_remove(position);
    if values.is_empty() {
        // Give the memory back: a pattern that had many values may not get them again.
        *values = Vec::new();
        return Removal::LastForPattern;
    }
    Removal::Removed
}

/// Walks the trie for the topic segments in `rest`, which follow the path of `node`.
fn visit_trie<V>(
    node: &Node<V>,
    rest: &str,
    visit: &mut impl FnMut(&[V]) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let (segment, remainder) = split_first_segment(rest);
    // Wildcards never match an empty segment, and no literal child is empty.
    if segment.is_empty() {
        return ControlFlow::Continue(());
    }

    // At least one segment is left, which is what `>` after this node needs.
    if !node.tail_values.is_empty() {
        visit(&node.tail_values)?;
    }
    if let Some(child) = node.children.get(segment) {
        visit_child(child, remainder, visit)?;
    }
    if let Some(child) = node.any_segment.as_deref() {
        visit_child(child, remainder, visit)?;
    }
    ControlFlow::Continue(())
}

fn visit_child<V>(
    child: &Node<V>,
    remainder: Option<&str>,
    visit: &mut impl FnMut(&[V]) -> ControlFlow<()>,
) -> ControlFlow<()> {
    match remainder {
        Some(remainder) => visit_trie(child, remainder, visit),
        None if child.values.is_empty() => ControlFlow::Continue(()),
        None => visit(&child.values),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 255;

    /// Returns the values matching `topic`, sorted, duplicates kept.
    fn matching(index: &SubscriptionIndex<u32>, topic: &str) -> Vec<u32> {
        let mut values = Vec::new();
        index.for_each_match(topic, |value| values.push(value));
        values.sort_unstable();
        values
    }

    #[test]
    fn validate_topic_accepts_valid_topics() {
        let longest = "a".repeat(MAX);
        let valid = [
            "a",
            "market_updates",
            "orders.eu.created",
            "Chat.Room",
            "A-b_c:d@e",
            "0.1.2",
            "user@example:42.inbox",
            longest.as_str(),
        ];
        for topic in valid {
            assert_eq!(validate_topic(topic, MAX), Ok(()), "topic {topic:?}");
        }
    }

    #[test]
    fn validate_topic_rejects_invalid_topics() {
        use TopicError::*;

        let too_long = "a".repeat(MAX + 1);
        let too_long_non_ascii = "é".repeat(200);
        let cases = [
            ("", Empty),
            (too_long.as_str(), TooLong { len: 256, max: MAX }),
            (too_long_non_ascii.as_str(), TooLong { len: 400, max: MAX }),
            (".", EmptySegment { segment: 1 }),
            (".a", EmptySegment { segment: 1 }),
            ("a.", EmptySegment { segment: 2 }),
            ("a..b", EmptySegment { segment: 2 }),
            (
                "a b",
                InvalidCharacter {
                    character: ' ',
                    offset: 1,
                },
            ),
            (
                "a/b",
                InvalidCharacter {
                    character: '/',
                    offset: 1,
                },
            ),
            (
                "a.b#",
                InvalidCharacter {
                    character: '#',
                    offset: 3,
                },
            ),
            (
                "a\n",
                InvalidCharacter {
                    character: '\n',
                    offset: 1,
                },
            ),
            (
                "é",
                InvalidCharacter {
                    character: 'é',
                    offset: 0,
                },
            ),
            (
                "ab.cé",
                InvalidCharacter {
                    character: 'é',
                    offset: 4,
                },
            ),
            (
                "a?",
                InvalidCharacter {
                    character: '?',
                    offset: 1,
                },
            ),
            ("a.*", Wildcard { segment: 2 }),
            ("*", Wildcard { segment: 1 }),
            (">", Wildcard { segment: 1 }),
            ("a.>", Wildcard { segment: 2 }),
            ("a.>.b", Wildcard { segment: 2 }),
            ("ord*", WildcardInsideSegment { segment: 1 }),
            ("a.b>", WildcardInsideSegment { segment: 2 }),
            ("a.**", WildcardInsideSegment { segment: 2 }),
            // The first broken rule from the left wins.
            ("a..*", EmptySegment { segment: 2 }),
            ("*.a..b", Wildcard { segment: 1 }),
            (
                "a b.*",
                InvalidCharacter {
                    character: ' ',
                    offset: 1,
                },
            ),
        ];
        for (topic, expected) in cases {
            assert_eq!(validate_topic(topic, MAX), Err(expected), "topic {topic:?}");
        }
    }

    #[test]
    fn validate_pattern_returns_kind() {
        let cases = [
            ("a", PatternKind::Exact),
            ("orders.eu.created", PatternKind::Exact),
            ("*", PatternKind::Wildcard),
            (">", PatternKind::Wildcard),
            ("a.*", PatternKind::Wildcard),
            ("a.>", PatternKind::Wildcard),
            ("*.>", PatternKind::Wildcard),
            ("orders.*.created", PatternKind::Wildcard),
            ("*.*.*", PatternKind::Wildcard),
        ];
        for (pattern, expected) in cases {
            assert_eq!(
                validate_pattern(pattern, MAX),
                Ok(expected),
                "pattern {pattern:?}"
            );
        }
    }

    #[test]
    fn validate_pattern_rejects_misplaced_wildcards() {
        use TopicError::*;

        let cases = [
            ("", Empty),
            ("a.>.b", TailWildcardNotLast { segment: 2 }),
            (">.a", TailWildcardNotLast { segment: 1 }),
            (">.>", TailWildcardNotLast { segment: 1 }),
            ("ord*", WildcardInsideSegment { segment: 1 }),
            ("a.*b", WildcardInsideSegment { segment: 2 }),
            ("a.**", WildcardInsideSegment { segment: 2 }),
            (">>", WildcardInsideSegment { segment: 1 }),
            ("*>", WildcardInsideSegment { segment: 1 }),
            ("a..*", EmptySegment { segment: 2 }),
            ("*.", EmptySegment { segment: 2 }),
            (
                "*.a b",
                InvalidCharacter {
                    character: ' ',
                    offset: 3,
                },
            ),
        ];
        for (pattern, expected) in cases {
            assert_eq!(
                validate_pattern(pattern, MAX),
                Err(expected),
                "pattern {pattern:?}"
            );
        }
    }

    #[test]
    fn validate_honours_max_len() {
        assert_eq!(validate_topic("abc", 3), Ok(()));
        assert_eq!(
            validate_topic("abcd", 3),
            Err(TopicError::TooLong { len: 4, max: 3 })
        );
        assert_eq!(validate_pattern("a.>", 3), Ok(PatternKind::Wildcard));
        assert_eq!(
            validate_pattern("a.*.b", 3),
            Err(TopicError::TooLong { len: 5, max: 3 })
        );
    }

    #[test]
    fn error_codes_follow_protocol() {
        use TopicError::*;

        let cases = [
            (Empty, "invalid_topic"),
            (TooLong { len: 300, max: MAX }, "topic_too_long"),
            (EmptySegment { segment: 2 }, "invalid_topic"),
            (
                InvalidCharacter {
                    character: ' ',
                    offset: 0,
                },
                "invalid_topic",
            ),
            (WildcardInsideSegment { segment: 1 }, "invalid_topic"),
            (TailWildcardNotLast { segment: 1 }, "invalid_topic"),
            (Wildcard { segment: 1 }, "wildcard_publish"),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "error {error:?}");
        }
    }

    #[test]
    fn error_messages_name_segment_and_character() {
        let empty_segment = validate_topic("a..b", MAX).unwrap_err();
        assert_eq!(empty_segment.to_string(), "topic segment 2 is empty");

        let invalid = validate_topic("a b", MAX).unwrap_err();
        assert!(invalid.to_string().contains("' ' at byte 1"), "{invalid}");

        let too_long = validate_topic("abcd", 3).unwrap_err();
        assert_eq!(
            too_long.to_string(),
            "topic is 4 bytes long, more than the maximum of 3 bytes"
        );
    }

    #[test]
    fn matches_follows_wildcard_rules() {
        let cases = [
            ("a", "a", true),
            ("a", "A", false),
            ("Chat.Room", "chat.room", false),
            ("a.b", "a.b", true),
            ("a.b", "a.bc", false),
            ("a.b", "a.b.c", false),
            ("a.b.c", "a.b", false),
            ("ab", "a.b", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*", "", false),
            ("*.*", "a.b", true),
            ("*.*", "a", false),
            ("a.*", "a", false),
            ("a.*", "a.b", true),
            ("a.*", "a.b.c", false),
            ("orders.*.created", "orders.eu.created", true),
            ("orders.*.created", "orders.created", false),
            ("orders.*.created", "orders.eu.west.created", false),
            ("orders.*.created", "orders.eu.deleted", false),
            (">", "a", true),
            (">", "a.b.c", true),
            (">", "", false),
            ("a.>", "a", false),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c", true),
            ("a.>", "b.c", false),
            ("a.>", "ab.c", false),
            ("orders.>", "orders.created", true),
            ("orders.>", "orders.eu.created", true),
            ("orders.>", "orders", false),
            ("a.*.>", "a.b", false),
            ("a.*.>", "a.b.c", true),
            ("a.*.>", "a.b.c.d", true),
            ("*.>", "a", false),
            ("*.>", "a.b", true),
        ];
        for (pattern, topic, expected) in cases {
            assert_eq!(
                matches(pattern, topic),
                expected,
                "pattern {pattern:?} topic {topic:?}"
            );
        }
    }

    #[test]
    fn redis_glob_maps_wildcards_to_star() {
        let cases = [
            ("nexus:", "market_updates", "nexus:market_updates"),
            ("nexus:", "orders.*.created", "nexus:orders.*.created"),
            ("nexus:", "orders.>", "nexus:orders.*"),
            ("", ">", "*"),
            ("", "*.*", "*.*"),
            ("n[1]?:", "a.*", "n\\[1\\]\\?:a.*"),
            ("n:", "a\\b.c*", "n:a\\\\b.c\\*"),
        ];
        for (prefix, pattern, expected) in cases {
            assert_eq!(
                redis_glob(prefix, pattern),
                expected,
                "prefix {prefix:?} pattern {pattern:?}"
            );
        }
    }

    #[test]
    fn index_reports_exact_and_wildcard_matches() {
        let mut index = SubscriptionIndex::new();
        assert_eq!(
            index.insert("orders.eu.created", 1),
            Insertion::FirstForPattern
        );
        assert_eq!(
            index.insert("orders.*.created", 2),
            Insertion::FirstForPattern
        );
        assert_eq!(index.insert("orders.>", 3), Insertion::FirstForPattern);
        assert_eq!(index.insert(">", 4), Insertion::FirstForPattern);
        assert_eq!(index.insert("*.eu.*", 5), Insertion::FirstForPattern);
        assert_eq!(index.insert("orders", 6), Insertion::FirstForPattern);

        assert_eq!(matching(&index, "orders.eu.created"), [1, 2, 3, 4, 5]);
        assert_eq!(matching(&index, "orders.us.created"), [2, 3, 4]);
        assert_eq!(matching(&index, "orders.eu.west.created"), [3, 4]);
        assert_eq!(matching(&index, "orders"), [4, 6]);
        assert_eq!(matching(&index, "Orders"), [4]);
        assert_eq!(matching(&index, "shop.eu.opened"), [4, 5]);
    }

    #[test]
    fn index_reports_value_once_per_matching_pattern() {
        let mut index = SubscriptionIndex::new();
        assert!(index.insert("a.b", 7).is_added());
        assert!(index.insert("a.*", 7).is_added());
        assert!(index.insert("a.>", 7).is_added());
        assert!(index.insert("a.c", 7).is_added());

        assert_eq!(matching(&index, "a.b"), [7, 7, 7]);
        assert_eq!(matching(&index, "a.c"), [7, 7, 7]);
        assert_eq!(matching(&index, "a.b.c"), [7]);
        assert_eq!(index.pattern_count(), 4);
    }

    #[test]
    fn index_wildcards_need_segments() {
        let mut index = SubscriptionIndex::new();
        assert!(index.insert("a.>", 1).is_added());
        assert!(index.insert("*", 2).is_added());
        assert!(index.insert(">", 3).is_added());

        assert_eq!(matching(&index, "a"), [2, 3]);
        assert_eq!(matching(&index, "a.b"), [1, 3]);
        assert_eq!(matching(&index, "a.b.c"), [1, 3]);
        assert_eq!(matching(&index, ""), [] as [u32; 0]);
        assert!(!index.has_match(""));
    }

    #[test]
    fn index_insert_twice_changes_nothing() {
        let mut index = SubscriptionIndex::new();
        assert_eq!(index.insert("a.*", 1), Insertion::FirstForPattern);
        assert_eq!(index.insert("a.*", 1), Insertion::AlreadyPresent);
        assert!(!index.insert("a.*", 1).is_added());
        assert_eq!(index.insert("a.b", 1), Insertion::FirstForPattern);
        assert_eq!(index.insert("a.b", 1), Insertion::AlreadyPresent);

        assert_eq!(index.pattern_count(), 2);
        assert_eq!(matching(&index, "a.b"), [1, 1]);
    }

    #[test]
    fn index_signals_first_and_last_value_of_pattern() {
        for pattern in ["market_updates", "orders.*.created", "orders.>"] {
            let mut index = SubscriptionIndex::new();
            assert_eq!(
                index.insert(pattern, 1),
                Insertion::FirstForPattern,
                "{pattern}"
            );
            assert_eq!(index.insert(pattern, 2), Insertion::Added, "{pattern}");
            assert_eq!(index.pattern_count(), 1, "{pattern}");

            assert_eq!(index.remove(pattern, 1), Removal::Removed, "{pattern}");
            assert_eq!(index.remove(pattern, 1), Removal::NotPresent, "{pattern}");
            assert_eq!(index.pattern_count(), 1, "{pattern}");
            assert_eq!(
                index.remove(pattern, 2),
                Removal::LastForPattern,
                "{pattern}"
            );
            assert_eq!(index.pattern_count(), 0, "{pattern}");
            assert_eq!(index.remove(pattern, 2), Removal::NotPresent, "{pattern}");
            assert!(!index.remove(pattern, 2).is_removed(), "{pattern}");

            assert_eq!(
                index.insert(pattern, 2),
                Insertion::FirstForPattern,
                "{pattern}"
            );
        }
    }

    #[test]
    fn index_remove_unknown_pattern_creates_nothing() {
        let mut index = SubscriptionIndex::<u32>::new();
        assert_eq!(index.remove("a.*.c", 1), Removal::NotPresent);
        assert_eq!(index.remove("a.>", 1), Removal::NotPresent);
        assert_eq!(index.remove("a.b", 1), Removal::NotPresent);
        assert!(index.root.is_empty());
        assert!(index.exact.is_empty());
    }

    #[test]
    fn index_remove_keeps_sibling_patterns() {
        let mut index = SubscriptionIndex::new();
        assert!(index.insert("a.*.c", 1).is_added());
        assert!(index.insert("a.*.d", 2).is_added());
        assert!(index.insert("a.*.>", 3).is_added());

        assert_eq!(index.remove("a.*.c", 1), Removal::LastForPattern);
        assert_eq!(matching(&index, "a.b.c"), [3]);
        assert_eq!(matching(&index, "a.b.d"), [2, 3]);

        let star = index.root.children["a"].any_segment.as_deref();
        let star = star.expect("the `a.*` node is still in use");
        assert!(!star.children.contains_key("c"));
        assert!(star.children.contains_key("d"));
        assert_eq!(star.tail_values, [3]);
    }

    #[test]
    fn index_remove_frees_empty_nodes() {
        let patterns = [
            "a.b.c", "a.*.c", "a.>", "*.*.*", ">", "x.y.z.*", "a.b.>", "*",
        ];
        let mut index = SubscriptionIndex::new();
        for round in 0..3 {
            for (value, pattern) in (0u32..).zip(patterns) {
                assert!(index.insert(pattern, value).is_added(), "{pattern}");
                assert!(index.insert(pattern, value + 100).is_added(), "{pattern}");
            }
            assert_eq!(index.pattern_count(), patterns.len(), "round {round}");

            for (value, pattern) in (0u32..).zip(patterns) {
                assert_eq!(index.remove(pattern, value), Removal::Removed, "{pattern}");
                assert_eq!(
                    index.remove(pattern, value + 100),
                    Removal::LastForPattern,
                    "{pattern}"
                );
            }
            assert_eq!(index.pattern_count(), 0, "round {round}");
            assert!(index.root.is_empty(), "round {round}: {:?}", index.root);
            assert!(index.exact.is_empty(), "round {round}");
            assert!(!index.has_match("a.b.c"), "round {round}");
        }
    }

    #[test]
    fn index_has_match_covers_each_kind() {
        let mut index = SubscriptionIndex::new();
        assert!(!index.has_match("a.b"));

        assert!(index.insert("a.b", 1).is_added());
        assert!(index.has_match("a.b"));
        assert!(!index.has_match("a.c"));

        assert!(index.insert("a.*", 2).is_added());
        assert!(index.has_match("a.c"));
        assert!(!index.has_match("a.c.d"));

        assert!(index.insert("a.>", 3).is_added());
        assert!(index.has_match("a.c.d"));
        assert!(!index.has_match("a"));
    }

    /// Builds every valid pattern of 1 to 3 segments over `a`, `b`, `*` and a final `>`.
    fn small_patterns() -> Vec<String> {
        let mut patterns = vec![String::new()];
        let mut all = Vec::new();
        for _ in 0..3 {
            let mut longer = Vec::new();
            for prefix in &patterns {
                for segment in ["a", "b", "*", ">"] {
                    let pattern = if prefix.is_empty() {
                        segment.to_string()
                    } else {
                        format!("{prefix}.{segment}")
                    };
                    if segment != ">" {
                        longer.push(pattern.clone());
                    }
                    all.push(pattern);
                }
            }
            patterns = longer;
        }
        all
    }

    /// Builds every topic of 1 to 4 segments over `a`, `b` and `c`.
    fn small_topics() -> Vec<String> {
        let mut topics: Vec<String> = Vec::new();
        let mut last: Vec<String> = vec![String::new()];
        for _ in 0..4 {
            last = last
                .iter()
                .flat_map(|prefix| {
                    ["a", "b", "c"].map(|segment| {
                        if prefix.is_empty() {
                            segment.to_string()
                        } else {
                            format!("{prefix}.{segment}")
                        }
                    })
                })
                .collect();
            topics.extend(last.iter().cloned());
        }
        topics
    }

    #[test]
    fn index_agrees_with_matches_on_all_small_cases() {
        let patterns = small_patterns();
        let topics = small_topics();
        assert_eq!(patterns.len(), 4 + 12 + 36);
        assert_eq!(topics.len(), 3 + 9 + 27 + 81);

        let mut index = SubscriptionIndex::new();
        for (value, pattern) in (0u32..).zip(&patterns) {
            assert_eq!(
                validate_pattern(pattern, MAX).map(|_| ()),
                Ok(()),
                "{pattern}"
            );
            assert_eq!(
                index.insert(pattern, value),
                Insertion::FirstForPattern,
                "{pattern}"
            );
        }

        for topic in &topics {
            let expected: Vec<u32> = (0u32..)
                .zip(&patterns)
                .filter(|(_, pattern)| matches(pattern, topic))
                .map(|(value, _)| value)
                .collect();
            assert_eq!(matching(&index, topic), expected, "topic {topic}");
            assert_eq!(
                index.has_match(topic),
                !expected.is_empty(),
                "topic {topic}"
            );
        }

        // Invalid topics never reach the index, but its walk still agrees with `matches`.
        for topic in ["", ".", "..", ".a", "a.", "a..b", "a.b.", "a..", "a.b..c"] {
            let expected: Vec<u32> = (0u32..)
                .zip(&patterns)
                .filter(|(_, pattern)| matches(pattern, topic))
                .map(|(value, _)| value)
                .collect();
            assert_eq!(matching(&index, topic), expected, "topic {topic:?}");
        }

        // Remove every other pattern and compare again, then remove the rest.
        for (value, pattern) in (0u32..).zip(&patterns).step_by(2) {
            assert_eq!(
                index.remove(pattern, value),
                Removal::LastForPattern,
                "{pattern}"
            );
        }
        for topic in &topics {
            let expected: Vec<u32> = (0u32..)
                .zip(&patterns)
                .skip(1)
                .step_by(2)
                .filter(|(_, pattern)| matches(pattern, topic))
                .map(|(value, _)| value)
                .collect();
            assert_eq!(matching(&index, topic), expected, "topic {topic}");
        }
        for (value, pattern) in (0u32..).zip(&patterns).skip(1).step_by(2) {
            assert_eq!(
                index.remove(pattern, value),
                Removal::LastForPattern,
                "{pattern}"
            );
        }
        assert!(index.root.is_empty());
        assert!(index.exact.is_empty());
    }
}
