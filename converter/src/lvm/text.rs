//! LVM's configuration text (`name { key = value ... }`), parsed with limits on nesting, item count
//! and length.

use super::{LvmError, MAX_METADATA};

const MAX_DEPTH: usize = 16;
const MAX_ITEMS: usize = 200_000;

/// A value in LVM's configuration text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Str(String),
    Array(Vec<Value>),
}

/// A section of LVM's configuration text: assignments and subsections, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Section {
    pub values: Vec<(String, Value)>,
    pub sections: Vec<(String, Section)>,
}

impl Section {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn section(&self, key: &str) -> Option<&Section> {
        self.sections.iter().find(|(k, _)| k == key).map(|(_, s)| s)
    }
    pub(super) fn int(&self, key: &str, owner: &str) -> Result<i64, LvmError> {
        match self.get(key) {
            Some(Value::Int(i)) => Ok(*i),
            _ => Err(LvmError::Metadata(format!(
                "{owner}: {key} missing or not an integer"
            ))),
        }
    }
    pub(super) fn uint(&self, key: &str, owner: &str) -> Result<u64, LvmError> {
        u64::try_from(self.int(key, owner)?)
            .map_err(|_| LvmError::Metadata(format!("{owner}: {key} is negative")))
    }
    pub(super) fn string(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
    pub(super) fn strings(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| match v {
                    Value::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
    items: usize,
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'+' | b'-')
}

impl Parser<'_> {
    fn err(&self, reason: impl Into<String>) -> LvmError {
        LvmError::Syntax {
            at: self.at,
            reason: reason.into(),
        }
    }

    fn skip_ws(&mut self) {
        while let Some(&c) = self.s.get(self.at) {
            if c == b'#' {
                while self.s.get(self.at).is_some_and(|&c| c != b'\n') {
                    self.at += 1;
                }
            } else if c.is_ascii_whitespace() {
                self.at += 1;
            } else {
                break;
            }
        }
    }

    fn name(&mut self) -> Result<String, LvmError> {
        let start = self.at;
        while self.s.get(self.at).is_some_and(|&c| is_name_byte(c)) {
            self.at += 1;
        }
        if start == self.at {
            return Err(self.err("expected a name"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }

    fn section(&mut self, depth: usize) -> Result<Section, LvmError> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!("sections nested deeper than {MAX_DEPTH}")));
        }
        let mut sec = Section::default();
        loop {
            self.skip_ws();
            match self.s.get(self.at) {
                None if depth == 0 => return Ok(sec),
                None => return Err(self.err("unterminated section")),
                Some(b'}') if depth > 0 => {
                    self.at += 1;
                    return Ok(sec);
                }
                _ => {}
            }
            self.items += 1;
            if self.items > MAX_ITEMS {
                return Err(self.err(format!("more than {MAX_ITEMS} items")));
            }
            let name = self.name()?;
            self.skip_ws();
            match self.s.get(self.at) {
                Some(b'{') => {
                    self.at += 1;
                    let sub = self.section(depth + 1)?;
                    sec.sections.push((name, sub));
                }
                Some(b'=') => {
                    self.at += 1;
                    self.skip_ws();
                    let v = self.value(true)?;
                    sec.values.push((name, v));
                }
                _ => return Err(self.err(format!("expected = or {{ after {name:?}"))),
            }
        }
    }

    fn value(&mut self, array_ok: bool) -> Result<Value, LvmError> {
        match self.s.get(self.at) {
            Some(b'"') => self.string(),
            Some(b'[') if array_ok => {
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_ws();
                    if self.s.get(self.at) == Some(&b']') {
                        self.at += 1;
                        return Ok(Value::Array(items));
                    }
                    if !items.is_empty() {
                        if self.s.get(self.at) != Some(&b',') {
                            return Err(self.err("expected , or ] in array"));
                        }
                        self.at += 1;
                        self.skip_ws();
                    }
                    self.items += 1;
                    if self.items > MAX_ITEMS {
                        return Err(self.err(format!("more than {MAX_ITEMS} items")));
                    }
                    items.push(self.value(false)?);
                }
            }
            Some(c) if c.is_ascii_digit() || *c == b'-' => {
                let start = self.at;
                self.at += 1;
                while self
                    .s
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
                {
                    self.at += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.at]).unwrap_or("");
                if t.contains('.') {
                    t.parse()
                        .map(Value::Float)
                        .map_err(|_| self.err(format!("bad number {t:?}")))
                } else {
                    t.parse()
                        .map(Value::Int)
                        .map_err(|_| self.err(format!("bad integer {t:?}")))
                }
            }
            _ => Err(self.err("expected a value")),
        }
    }

    fn string(&mut self) -> Result<Value, LvmError> {
        self.at += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.at) {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(Value::Str(String::from_utf8_lossy(&out).into_owned()));
                }
                Some(b'\\') => {
                    let Some(&c) = self.s.get(self.at + 1) else {
                        return Err(self.err("unterminated string"));
                    };
                    out.push(c);
                    self.at += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.at += 1;
                }
            }
        }
    }
}

/// Parse LVM configuration text into its top-level section.
pub fn parse_config(text: &str) -> Result<Section, LvmError> {
    if text.len() as u64 > MAX_METADATA {
        return Err(LvmError::Syntax {
            at: 0,
            reason: format!("{} bytes is more than {MAX_METADATA}", text.len()),
        });
    }
    let mut p = Parser {
        s: text.as_bytes(),
        at: 0,
        items: 0,
    };
    p.section(0)
}
