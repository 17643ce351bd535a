//! How deeply a document the admin API reads is nested, measured in one linear pass before
//! any parser sees it, so that a document nested too deeply is refused at once.
//!
//! Why before the parser: libyaml (under `serde_yaml_ng`) spends time in proportion to the
//! number of open flow collections (`[`, `{`) on every token it reads, so a YAML document
//! nested `n` deep costs `n²`: 200 KB nested 100,000 deep took 47 s, on the threads that
//! answer checks. `toml` and `serde_json` stop at recursion limits of their own (80 and 128),
//! in linear time, but `toml` reads the whole document before it gets there. One bound,
//! counted here the same way for the three formats, refuses them all quickly and with one
//! message.
//!
//! Depth is the number of collections open at once (mappings, tables, objects, sequences,
//! arrays), the document's own top level counted: `{"rules": [{"match": {}}]}` is 4 deep,
//! and so is `[[rules]]` followed by `match = {}` in TOML.

use crate::config::file::Format;
use crate::error::ApiError;

/// The deepest document the admin API reads. A real configuration is nested five or six
/// levels (document, `rules`, a rule, `match`, `headers`, a header); 64 leaves ten times
/// that, and stays below every parser's own limit (`toml` 80, `serde_json` and
/// `serde_yaml_ng` 128), so that this bound, with its one message, is the one a client
/// meets. At 64, libyaml's cost per token is a small constant: a 16 MB YAML document of
/// 64-deep flow collections parses in about twice the time of one 8 deep.
pub const MAX_DEPTH: usize = 64;

/// Where a document went deeper than the bound (both counted from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    pub line: usize,
    pub column: usize,
}

impl TooDeep {
    /// At byte `at` of `text`: the line by `\n`, the column in characters.
    fn at(text: &[u8], at: usize) -> TooDeep {
        let before = text.get(..at).unwrap_or(text);
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        TooDeep {
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            column: chars(&before[line_start..]) + 1,
        }
    }
}

impl From<TooDeep> for ApiError {
    fn from(error: TooDeep) -> Self {
        ApiError::invalid(
            "",
            format!(
                "line {}, column {}: the document is nested more than {MAX_DEPTH} levels deep, \
                 the most the admin API reads",
                error.line, error.column
            ),
        )
    }
}

/// Refuses `text` if it is nested deeper than [`MAX_DEPTH`].
pub fn check(text: &[u8], format: Format) -> Result<(), TooDeep> {
    deepest(text, format, MAX_DEPTH).map(drop)
}

/// How deeply `text` is nested, as long as that is at most `limit`; where it went deeper
/// otherwise. The scan stops there: its time is linear in the length of `text`, whatever
/// it holds.
pub fn deepest(text: &[u8], format: Format, limit: usize) -> Result<usize, TooDeep> {
    match format {
        Format::Json => json(text, limit),
        Format::Toml => Toml {
            text,
            at: 0,
            limit,
            deepest: 1,
        }
        .document(),
        Format::Yaml => Yaml::new(text, limit).document(),
    }
}

/// Characters in UTF-8 `bytes` (bytes that do not continue a character).
fn chars(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b & 0xC0 != 0x80).count()
}

/// JSON: brackets and braces outside strings. Exact for what `serde_json` reads; it stops
/// at the first byte that is not JSON, and whatever this scan makes of the rest does not
/// matter.
fn json(text: &[u8], limit: usize) -> Result<usize, TooDeep> {
    let (mut depth, mut deepest) = (0, 0);
    let mut at = 0;
    const STRUCTURE: Stops = stops(b"\"[]{}");
    const STRING: Stops = stops(b"\"\\");
    while let (Some(next), _) = find(text, at, &STRUCTURE) {
        at = next;
        match text[at] {
            b'"' => loop {
                match find(text, at + 1, &STRING).0 {
                    Some(next) if text[next] == b'\\' => at = next + 1,
                    Some(next) => {
                        at = next;
                        break;
                    }
                    None => return Ok(deepest),
                }
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Err(TooDeep::at(text, at));
                }
                deepest = deepest.max(depth);
            }
            _ => depth = usize::saturating_sub(depth, 1),
        }
        at += 1;
    }
    Ok(deepest)
}

/// Bytes a scan stops at, as a table: the runs between them are skipped in a tight loop, so
/// that a 16 MB document is scanned in a fraction of the time its parse takes, even in an
/// unoptimized build.
type Stops = [bool; 256];

const fn stops(bytes: &[u8]) -> Stops {
    let mut table = [false; 256];
    let mut i = 0;
    while i < bytes.len() {
        table[bytes[i] as usize] = true;
        i += 1;
    }
    table
}

/// The first byte of `text` from `at` on in `stops`, and the characters before it.
fn find(text: &[u8], at: usize, stops: &Stops) -> (Option<usize>, usize) {
    let (mut i, mut chars) = (at, 0);
    while i < text.len() {
        let byte = text[i];
        if stops[byte as usize] {
            return (Some(i), chars);
        }
        chars += usize::from(byte & 0xC0 != 0x80);
        i += 1;
    }
    (None, chars)
}

/// TOML: the document is a table (1); a table header adds its key's segments (and one for
/// an array of tables, `[[…]]`); a dotted key adds its segments but the last; arrays and
/// inline tables add one each. A header that reaches through an array of tables declared
/// earlier (`[rules.match]` after `[[rules]]`) is counted by its segments: that level is
/// not visible in the text, and `toml` bounds it itself, in linear time.
struct Toml<'a> {
    text: &'a [u8],
    at: usize,
    limit: usize,
    deepest: usize,
}

impl Toml<'_> {
    fn peek(&self, ahead: usize) -> u8 {
        self.text.get(self.at + ahead).copied().unwrap_or(0)
    }

    fn done(&self) -> bool {
        self.at >= self.text.len()
    }

    /// A collection at `depth` opens at byte `at`.
    fn enter(&mut self, depth: usize, at: usize) -> Result<(), TooDeep> {
        if depth > self.limit {
            return Err(TooDeep::at(self.text, at));
        }
        self.deepest = self.deepest.max(depth);
        Ok(())
    }

    fn document(mut self) -> Result<usize, TooDeep> {
        let mut table = 1;
        loop {
            self.skip_space(true);
            if self.done() {
                return Ok(self.deepest);
            }
            if self.peek(0) == b'[' {
                let array = self.peek(1) == b'[';
                self.at += 1 + usize::from(array);
                let start = self.at;
                table = 1 + self.key() + usize::from(array);
                self.enter(table, start)?;
            } else {
                self.key_value(table)?;
            }
            // The rest of the line: a comment, or what `toml` refuses.
            self.skip_to_line_end();
        }
    }

    /// To the line's `\n` (or the end).
    fn skip_to_line_end(&mut self) {
        const NEWLINE: Stops = stops(b"\n");
        self.at = find(self.text, self.at, &NEWLINE)
            .0
            .unwrap_or(self.text.len());
    }

    /// Spaces, tabs and comments; line breaks too when `lines`.
    fn skip_space(&mut self, lines: bool) {
        loop {
            match self.peek(0) {
                b' ' | b'\t' => self.at += 1,
                b'\r' | b'\n' if lines => self.at += 1,
                b'#' => self.skip_to_line_end(),
                _ => return,
            }
        }
    }

    /// A key, bare, quoted or dotted, up to what ends it (`=`, `]`, `,`, `}` or the line):
    /// how many segments it has.
    fn key(&mut self) -> usize {
        let mut segments = 1;
        loop {
            self.skip_space(false);
            match self.peek(0) {
                b'"' | b'\'' => self.string(),
                b'.' => {
                    segments += 1;
                    self.at += 1;
                }
                b'=' | b']' | b',' | b'}' | b'#' | b'\n' | b'\r' => return segments,
                _ if self.done() => return segments,
                _ => self.at += 1,
            }
        }
    }

    /// `key = value` in a table at `depth`: a dotted key opens a table for each segment but
    /// the last.
    fn key_value(&mut self, depth: usize) -> Result<(), TooDeep> {
        let start = self.at;
        let depth = depth + self.key() - 1;
        if self.peek(0) != b'=' {
            return Ok(());
        }
        self.enter(depth, start)?;
        self.at += 1;
        self.value(depth)
    }

    /// A value whose container is at `depth`.
    fn value(&mut self, depth: usize) -> Result<(), TooDeep> {
        self.skip_space(false);
        match self.peek(0) {
            b'[' => {
                self.enter(depth + 1, self.at)?;
                self.at += 1;
                self.array(depth + 1)
            }
            b'{' => {
                self.enter(depth + 1, self.at)?;
                self.at += 1;
                self.inline_table(depth + 1)
            }
            b'"' | b'\'' => {
                self.string();
                Ok(())
            }
            b'\n' | b'\r' | b'#' => Ok(()),
            _ if self.done() => Ok(()),
            _ => {
                // A number, a date, a boolean (or what `toml` refuses): at least one byte.
                self.at += 1;
                while !matches!(
                    self.peek(0),
                    b' ' | b'\t' | b'\r' | b'\n' | b',' | b']' | b'}' | b'#' | b'[' | b'{'
                ) && !self.done()
                {
                    self.at += 1;
                }
                Ok(())
            }
        }
    }

    /// The elements of an array at `depth`, after its `[`.
    fn array(&mut self, depth: usize) -> Result<(), TooDeep> {
        loop {
            self.skip_space(true);
            match self.peek(0) {
                b']' => {
                    self.at += 1;
                    return Ok(());
                }
                b',' | b'}' => self.at += 1,
                _ if self.done() => return Ok(()),
                _ => self.value(depth)?,
            }
        }
    }

    /// The keys and values of an inline table at `depth`, after its `{`.
    fn inline_table(&mut self, depth: usize) -> Result<(), TooDeep> {
        loop {
            self.skip_space(true);
            match self.peek(0) {
                b'}' => {
                    self.at += 1;
                    return Ok(());
                }
                b',' | b']' => self.at += 1,
                _ if self.done() => return Ok(()),
                _ => {
                    let start = self.at;
                    self.key_value(depth)?;
                    if self.at == start {
                        self.at += 1;
                    }
                }
            }
        }
    }

    /// A string at its opening quote: basic (`"`, escapes) or literal (`'`), on one line or
    /// three quotes to three quotes.
    fn string(&mut self) {
        let quote = self.peek(0);
        let escapes = quote == b'"';
        const BASIC: Stops = stops(b"\"\\\n");
        const LITERAL: Stops = stops(b"'\n");
        let multiline = self.peek(1) == quote && self.peek(2) == quote;
        self.at += if multiline { 3 } else { 1 };
        loop {
            let (next, _) = find(self.text, self.at, if escapes { &BASIC } else { &LITERAL });
            let Some(next) = next else {
                self.at = self.text.len();
                return;
            };
            self.at = next;
            match self.peek(0) {
                b'\\' => self.at += 2,
                b'\n' if multiline => self.at += 1,
                b'\n' => return,
                _ if !multiline => {
                    self.at += 1;
                    return;
                }
                _ if self.peek(1) == quote && self.peek(2) == quote => {
                    // Up to two more quotes belong to the string.
                    self.at += 3;
                    for _ in 0..2 {
                        if self.peek(0) == quote {
                            self.at += 1;
                        }
                    }
                    return;
                }
                _ => self.at += 1,
            }
        }
    }
}

/// YAML, as libyaml's scanner reads it: its rules for plain, quoted and block scalars,
/// comments, simple keys and block indentation, followed step by step, so that what this
/// scan skips as the inside of a scalar is what libyaml skips too, and every `[` or `{`
/// that libyaml opens is counted (a misreading could otherwise hide a deep flow collection
/// inside what looks like a string). Where libyaml would stop with an error, this scan goes
/// on: libyaml does no more work there, so nothing after it can cost time.
///
/// Depth is the block collections open (libyaml's indentation levels, and a sequence
/// written at its mapping's indentation), plus the flow collections open. A single-pair
/// mapping inside a flow sequence (`[a: b]`) and a collection used as a key are not
/// counted as a level of their own; neither costs libyaml anything per token.
struct Yaml<'a> {
    text: &'a [u8],
    at: usize,
    line: usize,
    /// In characters, as libyaml counts.
    column: usize,
    limit: usize,
    deepest: usize,
    /// libyaml's indentation levels: the block collections open.
    blocks: Vec<Block>,
    /// Sequences written at their mapping's indentation (`key:` then `- item`).
    indentless: usize,
    /// Flow collections open.
    flow: usize,
    /// Whether a simple key may start here (libyaml's `simple_key_allowed`).
    key_allowed: bool,
    /// Where a simple key of the block context started (line, column), while it may still
    /// be one.
    key: Option<(usize, usize)>,
}

/// The bytes that may start a line break: `\r`, `\n`, and the first of NEL, LS and PS.
const BREAKS: Stops = stops(b"\r\n\xC2\xE2");

/// What a plain scalar's run of characters stops at: a blank or a break, or what may end
/// it (`: `, and in a flow collection `,[]{}`).
const PLAIN: Stops = stops(b" \t:,[]{}\r\n\xC2\xE2");

/// What after a space needs a plain scalar's slow path: `#`, another blank, a break, or the
/// end (a 0 byte here).
const PLAIN_AFTER_SPACE: Stops = stops(b"# \t\r\n\xC2\xE2\0");

#[derive(Clone, Copy)]
struct Block {
    column: usize,
    mapping: bool,
    /// A sequence open at this mapping's indentation.
    indentless: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mapping,
    Sequence,
}

impl<'a> Yaml<'a> {
    fn new(text: &'a [u8], limit: usize) -> Self {
        // The reader drops a byte order mark at the start.
        let at = if text.starts_with(b"\xEF\xBB\xBF") {
            3
        } else {
            0
        };
        Yaml {
            text,
            at,
            line: 0,
            column: 0,
            limit,
            deepest: 0,
            blocks: Vec::new(),
            indentless: 0,
            flow: 0,
            key_allowed: true,
            key: None,
        }
    }

    fn peek(&self, ahead: usize) -> u8 {
        self.text.get(self.at + ahead).copied().unwrap_or(0)
    }

    fn done(&self) -> bool {
        self.at >= self.text.len()
    }

    /// The length of the line break `ahead` bytes on (libyaml's: CR LF, CR, LF, NEL, LS,
    /// PS), or 0.
    fn break_at(&self, ahead: usize) -> usize {
        match (self.peek(ahead), self.peek(ahead + 1), self.peek(ahead + 2)) {
            (b'\r', b'\n', _) => 2,
            (b'\r' | b'\n', _, _) => 1,
            (0xC2, 0x85, _) => 2,
            (0xE2, 0x80, 0xA8 | 0xA9) => 3,
            _ => 0,
        }
    }

    fn blank_at(&self, ahead: usize) -> bool {
        matches!(self.peek(ahead), b' ' | b'\t')
    }

    /// A blank, a line break or the end.
    fn blankz_at(&self, ahead: usize) -> bool {
        self.at + ahead >= self.text.len() || self.blank_at(ahead) || self.break_at(ahead) > 0
    }

    /// One character on.
    fn skip(&mut self) {
        let width = match self.peek(0) {
            0xF0..=0xFF => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        self.at += width;
        self.column += 1;
    }

    /// To the next byte in `stops`, or the end.
    fn skip_to(&mut self, stops: &Stops) {
        if self.at < self.text.len() {
            let (end, chars) = find(self.text, self.at, stops);
            self.at = end.unwrap_or(self.text.len());
            self.column += chars;
        }
    }

    /// To the end of the line, before its break.
    fn skip_to_line_end(&mut self) {
        loop {
            self.skip_to(&BREAKS);
            if self.done() || self.break_at(0) > 0 {
                return;
            }
            self.skip();
        }
    }

    /// Past a line break.
    fn skip_line(&mut self) {
        self.at += self.break_at(0).max(1);
        self.line += 1;
        self.column = 0;
    }

    /// `---` or `...` at the start of a line, then a blank or the end.
    fn document_marker(&self) -> bool {
        self.column == 0
            && matches!(
                (self.peek(0), self.peek(1), self.peek(2)),
                (b'-', b'-', b'-') | (b'.', b'.', b'.')
            )
            && self.blankz_at(3)
    }

    /// libyaml's current indentation: the column of the innermost block collection, or -1.
    fn indent(&self) -> isize {
        self.blocks.last().map_or(-1, |b| b.column as isize)
    }

    fn depth(&self) -> usize {
        self.blocks.len() + self.indentless + self.flow
    }

    /// The depth grew at the current character.
    fn deeper(&mut self) -> Result<(), TooDeep> {
        let depth = self.depth();
        if depth > self.limit {
            return Err(TooDeep {
                line: self.line + 1,
                column: self.column + 1,
            });
        }
        self.deepest = self.deepest.max(depth);
        Ok(())
    }

    /// libyaml's `roll_indent`: a block collection starts at `column` unless one already
    /// does there.
    fn roll(&mut self, column: usize, kind: Kind) -> Result<(), TooDeep> {
        if self.flow > 0 {
            return Ok(());
        }
        if self.indent() < column as isize {
            self.blocks.push(Block {
                column,
                mapping: kind == Kind::Mapping,
                indentless: false,
            });
            return self.deeper();
        }
        let Some(top) = self.blocks.last_mut() else {
            return Ok(());
        };
        if top.column != column {
            return Ok(());
        }
        match kind {
            // `- item` at its mapping's indentation: a sequence in the mapping's value.
            Kind::Sequence if top.mapping && !top.indentless => {
                top.indentless = true;
                self.indentless += 1;
                self.deeper()
            }
            // The mapping's next key ends that sequence.
            Kind::Mapping if top.indentless => {
                top.indentless = false;
                self.indentless -= 1;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// libyaml's `unroll_indent`: the block collections deeper than `column` end.
    fn unroll(&mut self, column: isize) {
        if self.flow > 0 {
            return;
        }
        while self.indent() > column {
            if let Some(block) = self.blocks.pop() {
                self.indentless -= usize::from(block.indentless);
            }
        }
    }

    /// libyaml's `save_simple_key`, for the block context (keys in flow collections open
    /// no block collection).
    fn save_key(&mut self) {
        if self.flow == 0 && self.key_allowed {
            self.key = Some((self.line, self.column));
        }
    }

    /// libyaml's `remove_simple_key`, for the block context.
    fn remove_key(&mut self) {
        if self.flow == 0 {
            self.key = None;
        }
    }

    fn document(mut self) -> Result<usize, TooDeep> {
        loop {
            self.skip_to_next_token();
            if self.done() {
                return Ok(self.deepest);
            }
            // A simple key is on one line.
            if self.key.is_some_and(|(line, _)| line < self.line) {
                self.key = None;
            }
            self.unroll(self.column as isize);
            let at = self.at;
            self.token()?;
            if self.at == at {
                self.skip(); // Never the case as libyaml reads; the scan moves on regardless.
            }
        }
    }

    /// libyaml's `scan_to_next_token`: blanks, comments and line breaks.
    fn skip_to_next_token(&mut self) {
        loop {
            let rest = self.text.get(self.at..).unwrap_or_default();
            if self.column == 0 && rest.starts_with(b"\xEF\xBB\xBF") {
                self.at += 3;
                self.column += 1;
            }
            while self.peek(0) == b' '
                || (self.peek(0) == b'\t' && (self.flow > 0 || !self.key_allowed))
            {
                self.skip();
            }
            if self.peek(0) == b'#' {
                self.skip_to_line_end();
            }
            if self.done() || self.break_at(0) == 0 {
                return;
            }
            self.skip_line();
            if self.flow == 0 {
                self.key_allowed = true;
            }
        }
    }

    /// libyaml's `fetch_next_token`, for what changes the depth.
    fn token(&mut self) -> Result<(), TooDeep> {
        let byte = self.peek(0);
        if self.column == 0 && byte == b'%' {
            // A directive: one line.
            self.unroll(-1);
            self.key = None;
            self.key_allowed = false;
            self.skip_to_line_end();
            return Ok(());
        }
        if self.document_marker() {
            self.unroll(-1);
            self.key = None;
            self.key_allowed = false;
            self.at += 3;
            self.column += 3;
            return Ok(());
        }
        let flow = self.flow > 0;
        match byte {
            b'[' | b'{' => {
                self.save_key();
                self.flow += 1;
                self.key_allowed = true;
                self.deeper()?;
                self.skip();
            }
            b']' | b'}' => {
                self.remove_key();
                self.flow = self.flow.saturating_sub(1);
                self.key_allowed = false;
                self.skip();
            }
            b',' => {
                self.remove_key();
                self.key_allowed = true;
                self.skip();
            }
            b'-' if self.blankz_at(1) => {
                self.roll(self.column, Kind::Sequence)?;
                self.remove_key();
                self.key_allowed = true;
                self.skip();
            }
            b'?' if flow || self.blankz_at(1) => {
                self.roll(self.column, Kind::Mapping)?;
                self.remove_key();
                self.key_allowed = !flow;
                self.skip();
            }
            b':' if flow || self.blankz_at(1) => {
                if flow {
                    self.key_allowed = false;
                } else if let Some((_, column)) = self.key.take() {
                    self.roll(column, Kind::Mapping)?;
                    self.key_allowed = false;
                } else {
                    self.roll(self.column, Kind::Mapping)?;
                    self.key_allowed = true;
                }
                self.skip();
            }
            b'*' | b'&' => {
                self.save_key();
                self.key_allowed = false;
                self.skip();
                while self.peek(0).is_ascii_alphanumeric() || matches!(self.peek(0), b'_' | b'-') {
                    self.skip();
                }
            }
            b'!' => {
                self.save_key();
                self.key_allowed = false;
                self.tag();
            }
            b'|' | b'>' if !flow => {
                self.remove_key();
                self.key_allowed = true;
                self.block_scalar();
            }
            b'\'' | b'"' => {
                self.save_key();
                self.key_allowed = false;
                self.quoted(byte == b'\'');
            }
            _ if self.plain_start(byte, flow) => {
                self.save_key();
                self.key_allowed = false;
                self.plain();
            }
            // libyaml stops here ("found character that cannot start any token").
            _ => self.skip(),
        }
        Ok(())
    }

    /// Whether `byte` starts a plain scalar (libyaml's test, in `fetch_next_token`).
    fn plain_start(&self, byte: u8, flow: bool) -> bool {
        let indicator = matches!(
            byte,
            b'-' | b'?'
                | b':'
                | b','
                | b'['
                | b']'
                | b'{'
                | b'}'
                | b'#'
                | b'&'
                | b'*'
                | b'!'
                | b'|'
                | b'>'
                | b'\''
                | b'"'
                | b'%'
                | b'@'
                | b'`'
        );
        !(self.blankz_at(0) || indicator)
            || (byte == b'-' && !self.blank_at(1))
            || (!flow && matches!(byte, b'?' | b':') && !self.blankz_at(1))
    }

    /// A tag: `!<verbatim>`, or `!`, a handle and a suffix, in libyaml's URI characters.
    fn tag(&mut self) {
        let verbatim = self.peek(1) == b'<';
        self.skip();
        if verbatim {
            self.skip();
        }
        loop {
            let byte = self.peek(0);
            let uri = byte.is_ascii_alphanumeric()
                || b"_-;/?:@&=+$.%!~*'()".contains(&byte)
                || (verbatim && b",[]".contains(&byte));
            if !uri || self.done() {
                break;
            }
            self.skip();
        }
        if verbatim && self.peek(0) == b'>' {
            self.skip();
        }
    }

    /// A single- or double-quoted scalar, from its opening quote: it may span lines.
    fn quoted(&mut self, single: bool) {
        const SINGLE: Stops = stops(b"'\\\r\n\xC2\xE2");
        const DOUBLE: Stops = stops(b"\"\\\r\n\xC2\xE2");
        let quote = if single { b'\'' } else { b'"' };
        self.skip();
        loop {
            self.skip_to(if single { &SINGLE } else { &DOUBLE });
            if self.done() {
                return; // libyaml stops: the end inside a scalar.
            }
            let byte = self.peek(0);
            if byte == quote {
                self.skip();
                // `''` is a quote inside a single-quoted scalar.
                if !single || self.peek(0) != b'\'' {
                    return;
                }
                self.skip();
            } else if byte == b'\\' && !single && self.break_at(1) > 0 {
                self.skip();
                self.skip_line();
            } else if byte == b'\\' && !single {
                self.skip();
                self.skip();
            } else if self.break_at(0) > 0 {
                self.skip_line();
            } else {
                self.skip();
            }
            if self.document_marker() {
                return; // libyaml stops: a document marker inside a scalar.
            }
        }
    }

    /// A plain scalar: in the block context it goes on over the lines indented more than
    /// the current block collection, whatever they hold.
    fn plain(&mut self) {
        let indent = self.indent() + 1;
        let flow = self.flow > 0;
        let mut leading_blanks = false;
        loop {
            if self.document_marker() || self.peek(0) == b'#' {
                break;
            }
            let start = self.at;
            loop {
                self.skip_to(&PLAIN);
                // One space between words: the scalar goes on (only `#`, another blank or
                // a line break after it could end it, and the loop below sees those).
                if self.peek(0) == b' ' && !PLAIN_AFTER_SPACE[usize::from(self.peek(1))] {
                    self.skip();
                    continue;
                }
                if self.blankz_at(0) {
                    break;
                }
                let byte = self.peek(0);
                if (byte == b':' && self.blankz_at(1))
                    || (flow && b",[]{}".contains(&byte))
                    || (flow && byte == b':' && b",?[]{}".contains(&self.peek(1)))
                {
                    break;
                }
                self.skip();
            }
            if self.at != start {
                leading_blanks = false;
            }
            if !(self.blank_at(0) || self.break_at(0) > 0) {
                break;
            }
            while self.blank_at(0) || self.break_at(0) > 0 {
                if self.blank_at(0) {
                    self.skip();
                } else {
                    self.skip_line();
                    leading_blanks = true;
                }
            }
            if !flow && (self.column as isize) < indent {
                break;
            }
        }
        if leading_blanks {
            self.key_allowed = true;
        }
    }

    /// A literal (`|`) or folded (`>`) scalar: its header, then every line indented at
    /// least as much as its first (and more than the current block collection).
    fn block_scalar(&mut self) {
        self.skip();
        let mut increment = 0;
        if matches!(self.peek(0), b'+' | b'-') {
            self.skip();
            if self.peek(0).is_ascii_digit() {
                increment = usize::from(self.peek(0) - b'0');
                self.skip();
            }
        } else if self.peek(0).is_ascii_digit() {
            increment = usize::from(self.peek(0) - b'0');
            self.skip();
            if matches!(self.peek(0), b'+' | b'-') {
                self.skip();
            }
        }
        while self.blank_at(0) {
            self.skip();
        }
        if self.peek(0) == b'#' {
            self.skip_to_line_end();
        }
        if self.done() {
            return;
        }
        if self.break_at(0) == 0 {
            return; // libyaml stops: no line break after the header.
        }
        self.skip_line();
        let parent = self.indent();
        let mut indent: isize = match increment {
            0 => 0,
            _ if parent >= 0 => parent + increment as isize,
            _ => increment as isize,
        };
        self.block_scalar_breaks(&mut indent, parent);
        while self.column as isize == indent && !self.done() {
            self.skip_to_line_end();
            if self.done() {
                return;
            }
            self.skip_line();
            self.block_scalar_breaks(&mut indent, parent);
        }
    }

    /// libyaml's `scan_block_scalar_breaks`: the indentation and empty lines before a line
    /// of a block scalar; the first one found sets the scalar's indentation.
    fn block_scalar_breaks(&mut self, indent: &mut isize, parent: isize) {
        let mut max_indent = 0;
        loop {
            while (*indent == 0 || (self.column as isize) < *indent) && self.peek(0) == b' ' {
                self.skip();
            }
            max_indent = max_indent.max(self.column as isize);
            if self.break_at(0) == 0 {
                break;
            }
            self.skip_line();
        }
        if *indent == 0 {
            *indent = max_indent.max(parent + 1).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(text: &str, format: Format) -> usize {
        deepest(text.as_bytes(), format, usize::MAX)
            .unwrap_or_else(|e| panic!("{format:?} refused at {e:?}: {text}"))
    }

    fn yaml(text: &str) -> usize {
        depth(text, Format::Yaml)
    }

    /// The depth of what `serde_yaml_ng` reads: what the scan must agree with.
    fn parsed_depth(value: &serde_yaml_ng::Value) -> usize {
        use serde_yaml_ng::Value;
        match value {
            Value::Sequence(items) => 1 + items.iter().map(parsed_depth).max().unwrap_or(0),
            Value::Mapping(map) => {
                1 + map
                    .iter()
                    .map(|(k, v)| parsed_depth(k).max(parsed_depth(v)))
                    .max()
                    .unwrap_or(0)
            }
            Value::Tagged(tagged) => parsed_depth(&tagged.value),
            _ => 0,
        }
    }

    fn agrees(text: &str) {
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"));
        assert_eq!(yaml(text), parsed_depth(&value), "{text}");
    }

    #[test]
    fn json_counts_brackets_outside_strings() {
        assert_eq!(depth("{}", Format::Json), 1);
        assert_eq!(depth(r#"{"rules": [{"match": {}}]}"#, Format::Json), 4);
        assert_eq!(depth(r#"{"a": "[[[{{{\"[[", "b": [1]}"#, Format::Json), 2);
        assert_eq!(depth(r#"["\\", [["]"]]]"#, Format::Json), 3);
    }

    #[test]
    fn toml_counts_tables_keys_arrays_and_inline_tables() {
        assert_eq!(depth("", Format::Toml), 1);
        assert_eq!(depth("a = 1", Format::Toml), 1);
        assert_eq!(depth("a.b.c = 1", Format::Toml), 3);
        assert_eq!(depth("[a]\nb = [[1], {c = {d = 2}}]", Format::Toml), 5);
        assert_eq!(depth("[[rules]]\nname = 'x'\nmatch = {}", Format::Toml), 4);
        assert_eq!(depth("[\"a.b\".'c.d']\n", Format::Toml), 3);
        assert_eq!(
            depth("a = \"[[[{{\" # [[[\nb = '''\n[[[\n'''", Format::Toml),
            1
        );
        assert_eq!(depth("a = \"\"\"\n\\\"\"\"[[[\"\"\"\"\"", Format::Toml), 1);
        assert_eq!(
            depth("a = [ # [[[\n  1,\n  [2],\n]\n[b.c]\n", Format::Toml),
            3
        );
    }

    #[test]
    fn yaml_counts_block_and_flow_collections_as_the_parser_reads_them() {
        for text in [
            "a: 1",
            "- 1",
            "- - - x",
            "- a: 1\n  b: [1, {c: [2]}]",
            "rules:\n- name: a\n  match:\n    headers:\n    - name: x\n      exact: y\n",
            "rules:\n  - name: a\n    match: {headers: [{name: x}]}\n",
            "a:\n  b:\n    c:\n      d: 1\ne: 2",
            "{\"rules\": [{\"match\": {}}]}",
            "? [a, b]\n: c",
            "? a\n: [b]\n? c\n: {d: [e]}",
            "&x a: *x",
            "!!map {a: !!seq [1]}",
            "---\na: [1]\n...\n",
            "# [[[\na: '[[[' # [[[\nb: \"]]]\\\"[[\"\nc: x[[[\nd: x ]]]\n",
            "a: |\n  [[[\n  {{{\nb: >-\n   [[[\n\n   ]]\nc: 1",
            "a: plain\n  [[[ still plain\n  - and this\nb: 1",
            "a: 'quoted\n  [[[ over ''lines'' ]]'\nb: [1]",
            "a: \"double \\\n  [[[ \\\" ]]]\"\nb: [1]",
            "- |2\n   [[[\n  x\n- [1]",
            "[a, 'b]', \"c]\", d#e, {f: g}]",
            "{a: [b, c], d: {e: f}}",
            "a:\n- b\n- c:\n  - d\ne: f",
            "- [a, [b, [c]]]\n- {x: {y: {z: 1}}}",
        ] {
            agrees(text);
        }
    }

    /// Documents a configuration file holds, in the three formats, are a few levels deep.
    #[test]
    fn real_configurations_are_shallow() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for name in ["demo-rules.toml", "native-ratelimit-rules.toml"] {
            let text = std::fs::read_to_string(root.join(name)).unwrap();
            let document = crate::config::file::parse(&text, Format::Toml).unwrap();
            for format in [Format::Toml, Format::Yaml, Format::Json] {
                let text = crate::config::file::render(&document, format).unwrap();
                let deep = depth(&text, format);
                assert!((2..=8).contains(&deep), "{name} as {format:?}: {deep}");
                if format == Format::Yaml {
                    agrees(&text);
                }
            }
        }
    }

    /// A deep flow collection that libyaml reads, hidden where a careless scan would see
    /// the inside of a scalar or a comment: each is still counted.
    #[test]
    fn a_deep_flow_collection_cannot_hide_from_the_scan() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for text in [
            // After a multi-line plain scalar that ends where the indentation does.
            format!("a: b\n  'c\nd: {deep}\ne: '"),
            // After a block scalar: its lines are those indented as its first, and that is
            // more than the mapping's key (column 2), not the line's start.
            format!("- a: |\n      x\n  b: {deep}"),
            // A block scalar whose first line is at its mapping's indentation is empty.
            format!("- a: |\n  b: {deep}"),
            // A quote inside a plain scalar does not open a string.
            format!("a: b'c\nd: {deep}\ne: 'f"),
            format!("[a'b, {deep}, 'c]"),
            // `#` without a blank before it is not a comment.
            format!("a: b#c\nd: {deep}"),
            // In a flow collection, `,` ends a tag.
            format!("[!t,{deep}]"),
            // A double-quoted scalar with an escaped quote ends at the next quote.
            format!("a: \"\\\"\"\nb: {deep}"),
            // Line breaks libyaml knows beyond \n.
            format!("a: b\r  'c\rd: {deep}\re: '"),
            format!("a: b\u{2028}  'c\u{2028}d: {deep}\u{2028}e: '"),
        ] {
            let refused = deepest(text.as_bytes(), Format::Yaml, MAX_DEPTH);
            assert!(refused.is_err(), "not refused: {text:?}");
        }
    }

    /// Random documents, written in every style the scanner must follow (block and flow,
    /// compact and indentless sequences, quoted, plain, multi-line and block scalars full
    /// of brackets, comments, anchors and tags): the scan's depth is the parser's.
    #[test]
    fn the_scan_agrees_with_the_parser_on_random_documents() {
        let mut random = Random(0x5EED_CAFE_F00D_BEEF);
        for _ in 0..3000 {
            let mut text = String::new();
            let depth = random.below(7);
            write_block(&mut random, &mut text, 0, At::Top, depth);
            agrees(&text);
        }
    }

    /// Whatever the bytes, each scan ends, without a panic (the admin API hands it bodies
    /// that are not even UTF-8).
    #[test]
    fn any_bytes_are_scanned_to_the_end() {
        let alphabet: &[&[u8]] = &[
            b"[",
            b"]",
            b"{",
            b"}",
            b",",
            b":",
            b"?",
            b"-",
            b"#",
            b"'",
            b"\"",
            b"\\",
            b"|",
            b">",
            b"&",
            b"*",
            b"!",
            b"<",
            b"%",
            b"=",
            b".",
            b" ",
            b"\t",
            b"\n",
            b"\r",
            b"a",
            b"1",
            b"+",
            b"---",
            b"...",
            b"'''",
            b"\"\"\"",
            b"\xC2\x85",
            b"\xE2\x80\xA8",
            b"\xEF\xBB\xBF",
            b"\xC3\xA9",
            b"\xE2",
            b"\xC2",
            b"\xF0",
            b"\0",
        ];
        let mut random = Random(0xB0B_5EED);
        for _ in 0..20_000 {
            let text: Vec<u8> = (0..random.below(40))
                .flat_map(|_| alphabet[random.below(alphabet.len())].iter().copied())
                .collect();
            for format in [Format::Json, Format::Toml, Format::Yaml] {
                let _ = deepest(&text, format, 8);
            }
        }
    }

    /// xorshift64*: enough to vary the documents, the same on every run.
    struct Random(u64);

    impl Random {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
        }
    }

    /// Where a value in the block context is written.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum At {
        /// At the start of the document.
        Top,
        /// After `key: `.
        Key,
        /// After `- `.
        Dash,
    }

    /// A scalar on one line, in the block context or (`flow`) in a flow collection.
    fn scalar(random: &mut Random, flow: bool) -> &'static str {
        let choices: &[&str] = if flow {
            &[
                "a",
                "'it''s [[ {{ \" # ]'",
                "\"q \\\" [[ ' # ]] \\\\\"",
                "x#y",
                "x y",
                "&n b",
            ]
        } else {
            &[
                "a",
                "'it''s [[ {{ \" # ]'",
                "\"q \\\" [[ ' # ]] \\\\\"",
                "x#]",
                "x [y ]z {w 'v\"",
                "&n b",
                "!t c",
            ]
        };
        choices[random.below(choices.len())]
    }

    /// A value `depth` deep in the block context, written where `at` says; `parent` is the
    /// column of its key or dash.
    fn write_block(random: &mut Random, text: &mut String, parent: usize, at: At, depth: usize) {
        let child = if at == At::Top { 0 } else { parent + 2 };
        let pad = " ".repeat(child);
        if depth == 0 {
            match random.below(5) {
                0 => text.push_str(&format!("|\n{pad}  [[[ {{{{ '\n\n{pad}   ]] # x\n")),
                1 => text.push_str(&format!("'multi\n{pad}  [[ line '' ]]'\n")),
                2 => text.push_str(&format!("plain\n{pad}  [[ more - x # [[\n")),
                _ => text.push_str(&format!("{} # [[ '\n", scalar(random, false))),
            }
            return;
        }
        let newline = |text: &mut String| {
            if at != At::Top {
                text.push('\n');
            }
        };
        match random.below(5) {
            0 => {
                if random.below(3) == 0 {
                    text.push_str("&m ");
                }
                write_flow(random, text, child + 4, depth);
                text.push('\n');
            }
            2 => {
                // A sequence on the next lines, indented or (after a key) not.
                newline(text);
                let column = if at == At::Key && random.below(2) == 0 {
                    parent
                } else {
                    child
                };
                for _ in 0..1 + random.below(2) {
                    text.push_str(&format!("{}- ", " ".repeat(column)));
                    write_block(random, text, column, At::Dash, depth - 1);
                }
            }
            3 if at == At::Dash => {
                // A compact sequence: `- - x`.
                text.push_str("- ");
                write_block(random, text, child, At::Dash, depth - 1);
            }
            4 if at == At::Dash => {
                // A compact mapping: `- k0: x`, then its other keys below the first.
                for i in 0..1 + random.below(2) {
                    if i > 0 {
                        text.push_str(&pad);
                    }
                    text.push_str(&format!("k{i}: "));
                    write_block(random, text, child, At::Key, depth - 1);
                }
            }
            _ => {
                // A mapping on the next lines.
                newline(text);
                for i in 0..1 + random.below(2) {
                    text.push_str(&format!("{pad}k{i}: "));
                    write_block(random, text, child, At::Key, depth - 1);
                }
            }
        }
    }

    /// A flow collection `depth` deep; lines it breaks are indented to `indent`.
    fn write_flow(random: &mut Random, text: &mut String, indent: usize, depth: usize) {
        if depth == 0 {
            text.push_str(scalar(random, true));
            return;
        }
        let mapping = random.below(2) == 0;
        text.push(if mapping { '{' } else { '[' });
        for i in 0..1 + random.below(3) {
            if i > 0 {
                match random.below(3) {
                    0 => text.push_str(&format!(", # ]]\n{}", " ".repeat(indent))),
                    _ => text.push_str(", "),
                }
            }
            if mapping {
                text.push_str(&format!("k{i}: "));
            }
            let depth = if i == 0 {
                depth - 1
            } else {
                random.below(depth)
            };
            write_flow(random, text, indent, depth);
        }
        text.push(if mapping { '}' } else { ']' });
    }
}
