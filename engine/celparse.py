"""CEL parsed by hand into the very trees cel-python's lark parser builds, several times faster.

cel-python parses with lark's LALR parser over its grammar (celpy/cel.lark), with positions
propagated: about 2 ms an expression, most of a large load. This is a recursive descent over the
same grammar that builds the same lark Trees (rule names, children, Tokens with their types and
positions, and each node's meta as lark's PropagatePositions sets it), for the expressions
policies are made of. Anything outside that (a syntax error, bytes, uint, hex, exponents, raw,
escaped or triple-quoted strings, comments, reserved words, a leading dot, a `-` before a digit,
where lark's contextual lexer decides) returns None, and lark parses it as before: errors keep
lark's messages and positions. tests/test_celparse.py holds both to the same trees over every
bundled expression, the generated ones and drawn ones.
"""

from __future__ import annotations

import re
from typing import Any

from lark import Token, Tree
from lark.tree import Meta

_LEXEME = re.compile(r"""
    (?P<space>[\t\n\f\r ]+)
  | (?P<ident>[_a-zA-Z][_a-zA-Z0-9]*)
  | (?P<float>[0-9]+\.[0-9]+)(?![\w.])
  | (?P<int>[0-9]+)(?![\w.])
  | (?P<string>"[^"\\\n\r]*"|'[^'\\\n\r]*')
  | (?P<op>\|\||&&|==|!=|<=|>=|[<>+\-*/%!?:,.()\[\]{}])
""", re.VERBOSE)
_RESERVED = frozenset({"as", "break", "const", "continue", "else", "for", "function", "if", "import", "let",
                       "loop", "package", "namespace", "return", "var", "void", "while"})
_RELATIONS = {"<": "relation_lt", "<=": "relation_le", ">": "relation_gt", ">=": "relation_ge",
              "==": "relation_eq", "!=": "relation_ne", "in": "relation_in"}
_ADDITIONS = {"+": "addition_add", "-": "addition_sub"}
_MULTIPLICATIONS = {"*": "multiplication_mul", "/": "multiplication_div", "%": "multiplication_mod"}
_NOWHERE = (None, None, None)

Span = tuple[Any, Any, Any]  # (line, column, offset) of a start, or of an end


class _Refused(Exception):
    """Not an expression this parser vouches for: lark parses it."""


def parse(text: str) -> Tree[Any] | None:
    """The lark tree of `text` as cel-python's parser builds it, or None (then parse with lark)."""
    parsed = parse_named(text)
    return None if parsed is None else parsed[0]


def parse_named(text: str) -> tuple[Tree[Any], frozenset[str]] | None:
    """parse, and the identifiers the tree reads (the names of its `ident` nodes), gathered as
    the parser makes them: no walk of the tree after. Every node's rule name is a plain str."""
    if '"""' in text or "'''" in text:
        return None
    try:
        tokens = _lex(text)
        if not tokens:
            return None
        parser = _Parser(tokens)
        tree, _, _ = parser.expr()
        if parser.at != len(tokens):
            return None
        return tree, frozenset(parser.names)
    except _Refused:
        return None


# A lexeme: (kind, text, start span, end span, Token or None). Kind is the operator itself, "in",
# or "value" for IDENT and literals (their lark Token is built here, as lark builds it).
Lexeme = tuple[str, str, Span, Span, Any]


def _lex(text: str) -> list[Lexeme]:
    found: list[Lexeme] = []
    line, line_start, at, end = 1, 0, 0, len(text)
    while at < end:
        match = _LEXEME.match(text, at)
        if match is None:
            raise _Refused
        kind = match.lastgroup
        value = match.group()
        stop = match.end()
        if kind == "space":
            newlines = value.count("\n")
            if newlines:
                line += newlines
                line_start = at + value.rfind("\n") + 1
            at = stop
            continue
        column = at - line_start + 1
        start: Span = (line, column, at)
        finish: Span = (line, column + len(value), stop)
        following = text[stop:stop + 1]
        if kind == "ident":
            if following in ("\"", "'") or value in _RESERVED:
                raise _Refused  # a raw or bytes string prefix, or a word the grammar keeps
            if value == "in":
                found.append(("in", value, start, finish, None))
            elif value in ("true", "false"):  # cel-python's lexer callback makes a Token with no position
                found.append(("value", value, _NOWHERE, _NOWHERE, Token("BOOL_LIT", value)))
            else:
                found.append(("value", value, start, finish,
                              Token("NULL_LIT" if value == "null" else "IDENT", value, at, line, column, line,
                                    column + len(value), stop)))
        elif kind == "op":
            if value in ("-", ".") and (following.isdigit() or following == "."):
                raise _Refused  # `-1` and `.5` are lexed as literals by lark's contextual lexer
            if value == "/" and following == "/":
                raise _Refused  # a comment
            found.append((value, value, start, finish, None))
        else:
            literal = {"float": "FLOAT_LIT", "int": "INT_LIT", "string": "STRING_LIT"}[kind]  # type: ignore[index]
            found.append(("value", value, start, finish,
                          Token(literal, value, at, line, column, line, column + len(value), stop)))
        at = stop
    return found


def _meta(start: Span, end: Span) -> Meta:
    meta = _new(Meta)
    line, column, offset = start
    end_line, end_column, end_offset = end
    meta.__dict__ = {
        "empty": False, "line": line, "column": column, "start_pos": offset,
        "container_line": line, "container_column": column, "container_start_pos": offset,
        "end_line": end_line, "end_column": end_column, "end_pos": end_offset,
        "container_end_line": end_line, "container_end_column": end_column, "container_end_pos": end_offset}
    return meta


_new = object.__new__


Parsed = tuple[Tree[Any], Span, Span]


class _Parser:
    def __init__(self, tokens: list[Lexeme]) -> None:
        self.tokens = tokens
        self.at = 0
        self.metas: dict[tuple[Span, Span], Meta] = {}
        self.names: set[str] = set()  # the identifiers read (parse_named)

    def node(self, data: str, children: list[Any], start: Span, end: Span) -> Tree[Any]:
        """A Tree with the meta lark's PropagatePositions gives it (nothing is inlined: container =
        own). Nodes of one span (the grammar's chains of one-child wrappers) share one Meta:
        nothing writes a meta after parsing."""
        key = (start, end)
        meta = self.metas.get(key)
        if meta is None:
            meta = self.metas[key] = _meta(start, end)
        return Tree(data, children, meta)

    def peek(self) -> str:
        return self.tokens[self.at][0] if self.at < len(self.tokens) else ""

    def take(self, kind: str) -> Lexeme:
        if self.peek() != kind:
            raise _Refused
        lexeme = self.tokens[self.at]
        self.at += 1
        return lexeme

    def expr(self) -> Parsed:
        condition, start, end = self.conditionalor()
        if self.peek() != "?":
            return self.node("expr", [condition], start, end), start, end
        self.at += 1
        when_true, _, _ = self.conditionalor()
        self.take(":")
        when_false, _, end = self.expr()
        return self.node("expr", [condition, when_true, when_false], start, end), start, end

    def conditionalor(self) -> Parsed:
        return self._chain("conditionalor", "||", self.conditionaland)

    def conditionaland(self) -> Parsed:
        return self._chain("conditionaland", "&&", self.relation)

    def _chain(self, name: str, operator: str, operand_of: Any) -> Parsed:
        """`name: [name operator] operand`: left-associative, the operator's token not kept."""
        operand, start, end = operand_of()
        tree = self.node(name, [operand], start, end)
        while self.peek() == operator:
            self.at += 1
            operand, _, end = operand_of()
            tree = self.node(name, [tree, operand], start, end)
        return tree, start, end

    def relation(self) -> Parsed:
        return self._binary("relation", _RELATIONS, self.addition)

    def addition(self) -> Parsed:
        return self._binary("addition", _ADDITIONS, self.multiplication)

    def multiplication(self) -> Parsed:
        return self._binary("multiplication", _MULTIPLICATIONS, self.unary)

    def _binary(self, name: str, operators: dict[str, str], operand_of: Any) -> Parsed:
        """`name: [name_op] operand` with `name_op: name "op"`: left-associative."""
        operand, start, end = operand_of()
        tree = self.node(name, [operand], start, end)
        while self.peek() in operators:
            operator = self.tokens[self.at]
            self.at += 1
            marked = self.node(operators[operator[0]], [tree], start, operator[3])
            operand, _, end = operand_of()
            tree = self.node(name, [marked, operand], start, end)
        return tree, start, end

    def unary(self) -> Parsed:
        kind = self.peek()
        if kind in ("!", "-"):
            sign = self.tokens[self.at]
            self.at += 1
            marker = self.node("unary_not" if kind == "!" else "unary_neg", [], sign[2], sign[3])
            operand, _, end = self.unary()
            return self.node("unary", [marker, operand], sign[2], end), sign[2], end
        operand, start, end = self.member()
        return self.node("unary", [operand], start, end), start, end

    def member(self) -> Parsed:
        primary, start, end = self.primary()
        tree = self.node("member", [primary], start, end)
        while True:
            kind = self.peek()
            if kind == ".":
                self.at += 1
                name = self.take("value")
                if name[4].type != "IDENT":
                    raise _Refused
                if self.peek() == "(":
                    self.at += 1
                    children = [tree, name[4], *self.exprlist(")")]
                    end = self.take(")")[3]
                    inner = self.node("member_dot_arg", children, start, end)
                else:
                    end = name[3]
                    inner = self.node("member_dot", [tree, name[4]], start, end)
            elif kind == "[":
                self.at += 1
                index, _, _ = self.expr()
                end = self.take("]")[3]
                inner = self.node("member_index", [tree, index], start, end)
            elif kind == "{":
                self.at += 1
                children = [tree, *self.inits("fieldinits")]
                end = self.take("}")[3]
                inner = self.node("member_object", children, start, end)
            else:
                return tree, start, end
            tree = self.node("member", [inner], start, end)

    def primary(self) -> Parsed:
        if self.at >= len(self.tokens):
            raise _Refused
        first = self.tokens[self.at]
        kind = first[0]
        self.at += 1
        start = first[2]
        if kind == "value":
            token = first[4]
            if token.type == "IDENT":
                if self.peek() == "(":
                    self.at += 1
                    children = [token, *self.exprlist(")")]
                    end = self.take(")")[3]
                    inner = self.node("ident_arg", children, start, end)
                else:
                    end = first[3]
                    self.names.add(str(token))
                    inner = self.node("ident", [token], start, end)
            else:
                end = first[3]
                inner = self.node("literal", [token], start, end)
        elif kind == "(":
            body, _, _ = self.expr()
            end = self.take(")")[3]
            inner = self.node("paren_expr", [body], start, end)
        elif kind == "[":
            children = self.exprlist("]")
            end = self.take("]")[3]
            inner = self.node("list_lit", children, start, end)
        elif kind == "{":
            children = self.inits("mapinits")
            end = self.take("}")[3]
            inner = self.node("map_lit", children, start, end)
        else:
            raise _Refused
        return self.node("primary", [inner], start, end), start, end

    def exprlist(self, closing: str) -> list[Tree[Any]]:
        """`[exprlist]` before `closing`: [] when it is absent, else [exprlist]."""
        if self.peek() == closing:
            return []
        items = []
        first, start, end = self.expr()
        items.append(first)
        while self.peek() == ",":
            self.at += 1
            item, _, end = self.expr()
            items.append(item)
        return [self.node("exprlist", items, start, end)]

    def inits(self, name: str) -> list[Tree[Any]]:
        """`[fieldinits]` (IDENT ":" expr, ...) or `[mapinits]` (expr ":" expr, ...) before "}"."""
        if self.peek() == "}":
            return []
        items: list[Any] = []
        start: Span = _NOWHERE
        end: Span = _NOWHERE
        while True:
            if name == "fieldinits":
                key = self.take("value")
                if key[4].type != "IDENT":
                    raise _Refused
                items.append(key[4])
                key_start = key[2]
            else:
                tree, key_start, _ = self.expr()
                items.append(tree)
            if len(items) == 1:
                start = key_start
            self.take(":")
            value, _, end = self.expr()
            items.append(value)
            if self.peek() != ",":
                return [self.node(name, items, start, end)]
            self.at += 1
