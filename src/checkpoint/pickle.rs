//! A pickle reader that never runs code: it builds an inert object graph.
//!
//! Python's unpickler is a stack machine whose `GLOBAL`, `REDUCE`, `NEWOBJ` and `BUILD`
//! opcodes import and call arbitrary functions, which is why loading an untrusted `.pth` with
//! `torch.load(weights_only=False)` can run any code. This reader executes the same opcodes
//! but *records* every would-be call as an [`Node::Object`] (the callable, its arguments, and
//! whatever `BUILD`, `SETITEMS` or `APPENDS` later applied to it), so nothing is imported or
//! called; interpreting the graph (a tensor from `torch._utils._rebuild_tensor_v2`, a dict
//! from `collections.OrderedDict`) is left to the caller, which only reads data.
//!
//! # Accepted opcodes
//! Every opcode of protocols 1 to 5 that can appear in a file: `PROTO`, `FRAME`, `STOP`,
//! `MARK`, `POP`, `POP_MARK`, `DUP`; `NONE`, `NEWTRUE`, `NEWFALSE`, `BININT`, `BININT1`,
//! `BININT2`, `LONG1`, `LONG4`, `BINFLOAT`; `BINUNICODE`, `SHORT_BINUNICODE`, `BINUNICODE8`,
//! `BINSTRING`, `SHORT_BINSTRING` (decoded as UTF-8), `BINBYTES`, `SHORT_BINBYTES`,
//! `BINBYTES8`, `BYTEARRAY8`; `EMPTY_LIST`, `APPEND`, `APPENDS`, `LIST`, `EMPTY_TUPLE`, `TUPLE`,
//! `TUPLE1`–`TUPLE3`, `EMPTY_DICT`, `DICT`, `SETITEM`, `SETITEMS`, `EMPTY_SET`, `ADDITEMS`,
//! `FROZENSET`; `GLOBAL`, `STACK_GLOBAL`, `REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `INST`, `OBJ`,
//! `BUILD` (all recorded, never called); `BINPERSID` (recorded for the caller to resolve);
//! `BINPUT`, `LONG_BINPUT`, `MEMOIZE`, `BINGET`, `LONG_BINGET`. Of protocol 0's text opcodes,
//! `INT`, `LONG`, `FLOAT`, `PUT` and `GET`.
//!
//! Refused with an error: `PERSID`, `STRING` and `UNICODE` (protocol 0 text with escapes),
//! `EXT1`/`EXT2`/`EXT4` (the copyreg extension registry), `NEXT_BUFFER`/`READONLY_BUFFER`
//! (out-of-band buffers, which a file cannot carry), and any unknown byte.
//!
//! # Resources
//! Nothing recurses: the reader is a loop over the input, and the graph is an arena of nodes
//! whose children are indices, so neither building nor dropping a deeply nested pickle uses
//! the call stack. Every opcode consumes at least one input byte and adds at most one node, one
//! stack value and one memo entry, lengths are checked against the remaining input before anything is copied, and the
//! memo and `DUP` share strings (`Rc`) and nodes (indices) instead of copying them: memory
//! stays proportional to the input.

use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// A pickled value. Containers and objects live in [`Pickle::nodes`]; a value refers to them
/// by index, so values are cheap to copy and never nest.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A larger integer: its little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    /// Index into [`Pickle::nodes`].
    Node(usize),
}

/// A container, a global reference or a recorded call.
#[derive(Debug)]
pub(crate) enum Node {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A set or frozenset.
    Set(Vec<Value>),
    /// `module.name`, as `GLOBAL`/`STACK_GLOBAL` name it: never imported.
    Global {
        module: Rc<str>,
        name: Rc<str>,
    },
    /// What `callable(*args)` (or `cls.__new__(cls, *args)`) would have built, never called,
    /// with what the pickle then applied to it: `BUILD`'s state, `SETITEMS`' pairs,
    /// `APPENDS`' items.
    Object {
        callable: Value,
        args: Value,
        state: Option<Value>,
        items: Vec<(Value, Value)>,
        appended: Vec<Value>,
    },
    /// A persistent id (`BINPERSID`): how `torch.save` refers to storages.
    PersistentId(Value),
}

/// The object graph of one pickle.
#[derive(Debug)]
pub(crate) struct Pickle {
    /// Every container and object built.
    pub nodes: Vec<Node>,
    /// The pickled object.
    pub root: Value,
}

/// Why a pickle was refused, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PickleError {
    /// Offset of the opcode in the input.
    pub offset: usize,
    /// What is wrong, in words.
    pub reason: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pickle: {} at byte {}", self.reason, self.offset)
    }
}

impl Pickle {
    /// The node a value refers to, if it is one.
    pub fn node(&self, value: &Value) -> Option<&Node> {
        match value {
            Value::Node(i) => self.nodes.get(*i),
            _ => None,
        }
    }

    /// The items of a tuple or list value.
    pub fn sequence(&self, value: &Value) -> Option<&[Value]> {
        match self.node(value)? {
            Node::Tuple(items) | Node::List(items) => Some(items),
            _ => None,
        }
    }

    /// `(module, name)` of a global value.
    pub fn global(&self, value: &Value) -> Option<(&str, &str)> {
        match self.node(value)? {
            Node::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// A short description for error messages: the type, or the callable of an object.
    pub fn describe(&self, value: &Value) -> String {
        match value {
            Value::None => "None".into(),
            Value::Bool(b) => format!("the boolean {b}"),
            Value::Int(i) => format!("the integer {i}"),
            Value::BigInt(_) => "a large integer".into(),
            Value::Float(x) => format!("the float {x}"),
            Value::Str(_) => "a string".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Node(_) => match self.node(value) {
                Some(Node::List(_)) => "a list".into(),
                Some(Node::Tuple(_)) => "a tuple".into(),
                Some(Node::Dict(_)) => "a dict".into(),
                Some(Node::Set(_)) => "a set".into(),
                Some(Node::Global { module, name }) => format!("a reference to {module}.{name}"),
                Some(Node::Object { callable, .. }) => match self.global(callable) {
                    Some((module, name)) => format!("an object built by {module}.{name} (never called)"),
                    None => "an object built by a computed callable (never called)".into(),
                },
                Some(Node::PersistentId(_)) => "a persistent id that is not a storage".into(),
                None => "a dangling reference".into(),
            },
        }
    }
}

/// Reads one pickle from the start of `input`; returns its graph and the offset just past
/// its `STOP`, where the next pickle of a stream (torch's legacy format) starts.
pub(crate) fn parse(input: &[u8]) -> Result<(Pickle, usize), PickleError> {
    Machine::new(input).run()
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for errors.
    op_at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    nodes: Vec<Node>,
}

impl<'a> Machine<'a> {
    fn new(input: &'a [u8]) -> Self {
        Machine {
            input,
            pos: 0,
            op_at: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            nodes: Vec::new(),
        }
    }

    fn fail<T>(&self, reason: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError { offset: self.op_at, reason: reason.into() })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        match self.pos.checked_add(n).filter(|&end| end <= self.input.len()) {
            Some(end) => {
                let bytes = &self.input[self.pos..end];
                self.pos = end;
                Ok(bytes)
            }
            None => self.fail(format!("{n} bytes claimed, {} left in the input", self.input.len() - self.pos)),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u8(&mut self) -> Result<usize, PickleError> {
        Ok(self.array::<1>()?[0] as usize)
    }

    fn u32(&mut self) -> Result<usize, PickleError> {
        Ok(u32::from_le_bytes(self.array()?) as usize)
    }

    fn u64(&mut self) -> Result<usize, PickleError> {
        let n = u64::from_le_bytes(self.array()?);
        // Lengths past usize are past the input anyway: `take` refuses them.
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// A `\n`-terminated line (text opcodes), without the newline.
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.input[self.pos..];
        let Some(len) = rest.iter().position(|&b| b == b'\n') else {
            return self.fail("unterminated text argument");
        };
        self.pos += len + 1;
        match std::str::from_utf8(&rest[..len]) {
            Ok(s) => Ok(s),
            Err(_) => self.fail("text argument is not UTF-8"),
        }
    }

    fn push_node(&mut self, node: Node) {
        self.nodes.push(node);
        self.stack.push(Value::Node(self.nodes.len() - 1));
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("stack underflow");
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("stack underflow");
        }
        Ok(self.stack.last_mut().expect("checked non-empty"))
    }

    /// Pops everything above the last mark, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let Some(mark) = self.marks.pop() else {
            return self.fail("no mark on the stack");
        };
        Ok(self.stack.split_off(mark))
    }

    fn node_mut(&mut self, value: &Value) -> Option<&mut Node> {
        match value {
            Value::Node(i) => self.nodes.get_mut(*i),
            _ => None,
        }
    }

    /// The memo index of a PUT/GET-family opcode: its 1- or 4-byte or text argument, or the
    /// next free index for MEMOIZE.
    fn memo_key(&mut self, op: u8) -> Result<u64, PickleError> {
        Ok(match op {
            b'q' | b'h' => self.u8()? as u64,
            b'r' | b'j' => self.u32()? as u64,
            0x94 => self.memo.len() as u64,
            _ => {
                let line = self.line()?;
                match line.parse::<u64>() {
                    Ok(key) => key,
                    Err(_) => return self.fail(format!("memo index {line:?}")),
                }
            }
        })
    }

    fn push_str(&mut self, bytes: &[u8]) {
        self.stack.push(Value::Str(Rc::from(String::from_utf8_lossy(bytes).as_ref())));
    }

    fn push_int_bytes(&mut self, bytes: &[u8]) {
        if bytes.len() <= 8 {
            // Sign-extend the little-endian two's complement.
            let fill = if bytes.last().is_some_and(|&b| b & 0x80 != 0) { 0xff } else { 0 };
            let mut full = [fill; 8];
            full[..bytes.len()].copy_from_slice(bytes);
            self.stack.push(Value::Int(i64::from_le_bytes(full)));
        } else {
            self.stack.push(Value::BigInt(Rc::from(bytes)));
        }
    }

    /// Pairs `k1, v1, k2, v2, …` into `(k, v)`s.
    fn pairs(&self, items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
        if !items.len().is_multiple_of(2) {
            return self.fail("odd number of items for a dict");
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        Ok(pairs)
    }

    /// `SETITEM(S)`: into a dict, or recorded on an object (dict subclasses, defaultdict…).
    fn set_items(&mut self, pairs: Vec<(Value, Value)>) -> Result<(), PickleError> {
        let target = self.top()?.clone();
        match self.node_mut(&target) {
            Some(Node::Dict(items)) | Some(Node::Object { items, .. }) => {
                items.extend(pairs);
                Ok(())
            }
            _ => self.fail("SETITEMS on something that is neither a dict nor an object"),
        }
    }

    /// `APPEND(S)`/`ADDITEMS`: into a list or set, or recorded on an object.
    fn append(&mut self, values: Vec<Value>) -> Result<(), PickleError> {
        let target = self.top()?.clone();
        match self.node_mut(&target) {
            Some(Node::List(items)) | Some(Node::Set(items)) | Some(Node::Object { appended: items, .. }) => {
                items.extend(values);
                Ok(())
            }
            _ => self.fail("APPENDS on something that is neither a list, a set nor an object"),
        }
    }

    fn object(&mut self, callable: Value, args: Value) {
        self.push_node(Node::Object { callable, args, state: None, items: Vec::new(), appended: Vec::new() });
    }

    fn run(mut self) -> Result<(Pickle, usize), PickleError> {
        loop {
            self.op_at = self.pos;
            let Some(&op) = self.input.get(self.pos) else {
                return self.fail("input ends before STOP");
            };
            self.pos += 1;
            match op {
                b'.' => {
                    // STOP
                    let root = self.pop()?;
                    if !self.marks.is_empty() || !self.stack.is_empty() {
                        return self.fail("STOP with values or marks left on the stack");
                    }
                    return Ok((Pickle { nodes: self.nodes, root }, self.pos));
                }
                0x80 => {
                    // PROTO
                    let proto = self.u8()?;
                    if proto > 5 {
                        return self.fail(format!("pickle protocol {proto} (this reader knows 1 to 5)"));
                    }
                }
                0x95 => {
                    // FRAME: framing is advisory; the frame length is skipped.
                    self.take(8)?;
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?.clone();
                    self.stack.push(top);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    // LONG1
                    let n = self.u8()?;
                    let bytes = self.take(n)?;
                    self.push_int_bytes(bytes);
                }
                0x8b => {
                    // LONG4
                    let n = i32::from_le_bytes(self.array()?);
                    let Ok(n) = usize::try_from(n) else { return self.fail("negative LONG4 length") };
                    let bytes = self.take(n)?;
                    self.push_int_bytes(bytes);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.stack.push(Value::Float(v));
                }
                b'I' => {
                    // INT (text): also `I01`/`I00` for True/False.
                    let line = self.line()?;
                    let value = match line {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => match line.parse::<i64>() {
                            Ok(v) => Value::Int(v),
                            Err(_) => return self.fail(format!("INT argument {line:?}")),
                        },
                    };
                    self.stack.push(value);
                }
                b'L' => {
                    let line = self.line()?;
                    match line.strip_suffix('L').unwrap_or(line).parse::<i64>() {
                        Ok(v) => self.stack.push(Value::Int(v)),
                        Err(_) => return self.fail(format!("LONG argument {line:?}")),
                    }
                }
                b'F' => {
                    let line = self.line()?;
                    match line.parse::<f64>() {
                        Ok(v) => self.stack.push(Value::Float(v)),
                        Err(_) => return self.fail(format!("FLOAT argument {line:?}")),
                    }
                }
                b'X' | b'T' => {
                    // BINUNICODE, BINSTRING
                    let n = self.u32()?;
                    let bytes = self.take(n)?;
                    self.push_str(bytes);
                }
                0x8c | b'U' => {
                    // SHORT_BINUNICODE, SHORT_BINSTRING
                    let n = self.u8()?;
                    let bytes = self.take(n)?;
                    self.push_str(bytes);
                }
                0x8d => {
                    // BINUNICODE8
                    let n = self.u64()?;
                    let bytes = self.take(n)?;
                    self.push_str(bytes);
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                    let n = match op {
                        b'B' => self.u32()?,
                        b'C' => self.u8()?,
                        _ => self.u64()?,
                    };
                    let bytes = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(bytes)));
                }
                b']' => self.push_node(Node::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::List(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' | 0x90 => {
                    // APPENDS, ADDITEMS
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b')' => self.push_node(Node::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    // TUPLE1..TUPLE3
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_node(Node::Tuple(items));
                }
                b'}' => self.push_node(Node::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push_node(Node::Dict(pairs));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.set_items(pairs)?;
                }
                0x8f => self.push_node(Node::Set(Vec::new())),
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::Set(items));
                }
                b'c' => {
                    let module = Rc::from(self.line()?);
                    let name = Rc::from(self.line()?);
                    self.push_node(Node::Global { module, name });
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return self.fail("STACK_GLOBAL needs two strings");
                    };
                    self.push_node(Node::Global { module, name });
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.object(callable, args);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args)
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.object(cls, args);
                }
                0x92 => {
                    // NEWOBJ_EX: cls.__new__(cls, *args, **kwargs); kwargs dropped.
                    self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.object(cls, args);
                }
                b'i' => {
                    // INST module\nname\n: MARK args… INST
                    let module = Rc::from(self.line()?);
                    let name = Rc::from(self.line()?);
                    let args = self.pop_mark()?;
                    self.nodes.push(Node::Global { module, name });
                    let cls = Value::Node(self.nodes.len() - 1);
                    self.nodes.push(Node::Tuple(args));
                    let args = Value::Node(self.nodes.len() - 1);
                    self.object(cls, args);
                }
                b'o' => {
                    // OBJ: MARK cls args… OBJ
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return self.fail("OBJ without a class");
                    }
                    let cls = items.remove(0);
                    self.nodes.push(Node::Tuple(items));
                    let args = Value::Node(self.nodes.len() - 1);
                    self.object(cls, args);
                }
                b'b' => {
                    // BUILD: recorded on objects; dicts and others ignore it (an OrderedDict's
                    // `_metadata` arrives this way as an object's state).
                    let state = self.pop()?;
                    let target = self.top()?.clone();
                    if let Some(Node::Object { state: slot, .. }) = self.node_mut(&target) {
                        *slot = Some(state);
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push_node(Node::PersistentId(pid));
                }
                b'q' | b'r' | b'p' | 0x94 => {
                    // BINPUT, LONG_BINPUT, PUT, MEMOIZE
                    let key = self.memo_key(op)?;
                    let value = self.top()?.clone();
                    self.memo.insert(key, value);
                }
                b'h' | b'j' | b'g' => {
                    // BINGET, LONG_BINGET, GET
                    let key = self.memo_key(op)?;
                    let Some(value) = self.memo.get(&key).cloned() else {
                        return self.fail(format!("memo key {key} was never stored"));
                    };
                    self.stack.push(value);
                }
                b'P' | b'S' | b'V' => return self.fail(format!("protocol 0 opcode {:?} is not read", op as char)),
                0x82..=0x84 => return self.fail("extension-registry opcodes (EXT1/2/4) are not read"),
                0x97 | 0x98 => return self.fail("out-of-band buffers cannot come from a file"),
                other => return self.fail(format!("unknown opcode 0x{other:02x}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Result<Pickle, PickleError> {
        parse(bytes).map(|(p, end)| {
            assert_eq!(end, bytes.len(), "the pickle ends at STOP");
            p
        })
    }

    #[test]
    fn scalars_strings_and_containers() {
        // {'a': [1, -2, 3.5, True, None], 'b': (b'xy', 70000)} at protocol 2.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b']', b'(', b'K', 1, b'J'];
        p.extend((-2i32).to_le_bytes());
        p.push(b'G');
        p.extend(3.5f64.to_be_bytes());
        p.extend([0x88, b'N', b'e', b'X', 1, 0, 0, 0, b'b', b'C', 2, b'x', b'y', b'J']);
        p.extend(70000i32.to_le_bytes());
        p.extend([0x86, b'u', b'.']);
        let pickle = parse_all(&p).unwrap();
        let Some(Node::Dict(items)) = pickle.node(&pickle.root) else { panic!("a dict: {pickle:?}") };
        assert_eq!(items[0].0, Value::Str("a".into()));
        assert_eq!(
            pickle.sequence(&items[0].1).unwrap(),
            &[Value::Int(1), Value::Int(-2), Value::Float(3.5), Value::Bool(true), Value::None]
        );
        assert_eq!(pickle.sequence(&items[1].1).unwrap(), &[Value::Bytes(Rc::from(&b"xy"[..])), Value::Int(70000)]);
    }

    #[test]
    fn long_integers_sign_extend_and_large_ones_stay_bytes() {
        let p = [
            0x80, 2, b'(', 0x8a, 2, 0x00, 0x80, 0x8a, 1, 0xff, 0x8a, 0, 0x8a, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, b't', b'.',
        ];
        let pickle = parse_all(&p).unwrap();
        let items = pickle.sequence(&pickle.root).unwrap();
        assert_eq!(items[0], Value::Int(-32768));
        assert_eq!(items[1], Value::Int(-1));
        assert_eq!(items[2], Value::Int(0));
        assert_eq!(items[3], Value::BigInt(Rc::from(&[1u8, 2, 3, 4, 5, 6, 7, 8, 9][..])));
    }

    #[test]
    fn globals_are_recorded_never_called() {
        // os.system('echo owned') via REDUCE, and a BUILD on it.
        let mut p = b"\x80\x02cos\nsystem\nX\x0a\x00\x00\x00echo owned\x85R}b.".to_vec();
        let pickle = parse_all(&p).unwrap();
        let Some(Node::Object { callable, args, state, .. }) = pickle.node(&pickle.root) else { panic!() };
        assert_eq!(pickle.global(callable), Some(("os", "system")));
        assert_eq!(pickle.sequence(args).unwrap(), &[Value::Str("echo owned".into())]);
        assert!(state.is_some());
        assert_eq!(pickle.describe(&pickle.root), "an object built by os.system (never called)");
        // STACK_GLOBAL + NEWOBJ at protocol 4.
        p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93)\x81.".to_vec();
        let pickle = parse_all(&p).unwrap();
        let Some(Node::Object { callable, .. }) = pickle.node(&pickle.root) else { panic!() };
        assert_eq!(pickle.global(callable), Some(("builtins", "eval")));
    }

    #[test]
    fn memo_shares_containers_filled_after_they_were_stored() {
        // d = {}; memoised; then filled; the root is (d, d): both see the item.
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00kK\x05sh\x00\x86.";
        let pickle = parse_all(p).unwrap();
        let items = pickle.sequence(&pickle.root).unwrap();
        assert_eq!(items[0], items[1]);
        let Some(Node::Dict(d)) = pickle.node(&items[1]) else { panic!() };
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn persistent_ids_are_recorded() {
        let p = b"\x80\x02X\x07\x00\x00\x00storageQ.";
        let pickle = parse_all(p).unwrap();
        let Some(Node::PersistentId(pid)) = pickle.node(&pickle.root) else { panic!() };
        assert_eq!(*pid, Value::Str("storage".into()));
    }

    #[test]
    fn stream_of_pickles_reports_where_each_ends() {
        let p = b"\x80\x02K\x01.\x80\x02K\x02.";
        let (first, end) = parse(p).unwrap();
        assert_eq!(first.root, Value::Int(1));
        let (second, end2) = parse(&p[end..]).unwrap();
        assert_eq!(second.root, Value::Int(2));
        assert_eq!(end + end2, p.len());
    }

    fn refused(bytes: &[u8], what: &str) {
        match parse(bytes) {
            Err(e) => assert!(e.reason.contains(what), "{e} should mention {what:?}"),
            Ok(p) => panic!("accepted {bytes:?}: {p:?}"),
        }
    }

    #[test]
    fn hostile_and_broken_pickles_are_refused() {
        refused(b"", "before STOP");
        refused(b"\x80\x02", "before STOP");
        refused(b"\x80\x02.", "underflow");
        refused(b"\x80\x02K\x01K\x02.", "left on the stack");
        refused(b"\x80\x02(K\x01.", "left on the stack");
        refused(b"\x80\x02e.", "no mark");
        refused(b"\x80\x02h\x07.", "never stored");
        refused(b"\x80\x02X\xff\xff\xff\xffabc.", "claimed");
        refused(b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xffabc.", "claimed");
        refused(b"\x80\x02\x8b\xff\xff\xff\xff.", "negative");
        refused(b"\x80\x02\x8b\x00\x00\x00\x7f.", "claimed");
        refused(b"\x80\x02\xff.", "unknown opcode");
        refused(b"\x80\x06K\x01.", "protocol 6");
        refused(b"\x80\x02\x82\x01.", "extension");
        refused(b"\x80\x05\x97.", "out-of-band");
        refused(b"\x80\x02Pfoo\n.", "protocol 0");
        refused(b"\x80\x02K\x01K\x02K\x03s.", "neither a dict");
        refused(b"\x80\x02K\x01K\x02a.", "neither a list");
        refused(b"\x80\x02(K\x01d.", "odd number");
        refused(b"\x80\x02cos\nsys", "unterminated");
        refused(b"\x80\x02K\x01\x93.", "underflow");
        refused(b"\x80\x02K\x01K\x02\x93.", "two strings");
    }

    #[test]
    fn deep_nesting_neither_recurses_nor_overflows() {
        // A million nested lists: [[[[…]]]], then dropped.
        let depth = 1_000_000;
        let mut p = vec![0x80, 2];
        for _ in 0..depth {
            p.extend([b']', b'(']);
        }
        p.extend(std::iter::repeat_n(b'e', depth));
        p.push(b'.');
        let pickle = parse_all(&p).unwrap();
        assert_eq!(pickle.nodes.len(), depth);
        drop(pickle);
        // A million marks with nothing closed is refused, not a crash.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', depth));
        p.push(b'.');
        refused(&p, "underflow");
    }

    #[test]
    fn memo_and_dup_share_instead_of_copying() {
        // A 1 MB string memoised, then fetched 100 000 times: shared, not copied.
        let mut p = vec![0x80, 2, b']', b'(', b'X'];
        p.extend((1u32 << 20).to_le_bytes());
        p.extend(std::iter::repeat_n(b'x', 1 << 20));
        p.extend([b'q', 0]);
        for _ in 0..100_000 {
            p.extend([b'h', 0, b'2']);
        }
        p.extend([b'e', b'.']);
        let pickle = parse_all(&p).unwrap();
        let items = pickle.sequence(&pickle.root).unwrap();
        assert_eq!(items.len(), 200_001);
        let (Value::Str(a), Value::Str(b)) = (&items[0], &items[200_000]) else { panic!() };
        assert!(Rc::ptr_eq(a, b));
    }

    #[test]
    fn text_opcodes_of_protocol_0() {
        let p = b"(I01\nI00\nI-7\nL12L\nF0.5\np3\n0g3\nt.";
        let pickle = parse_all(p).unwrap();
        assert_eq!(
            pickle.sequence(&pickle.root).unwrap(),
            &[Value::Bool(true), Value::Bool(false), Value::Int(-7), Value::Int(12), Value::Float(0.5)]
        );
    }
}
