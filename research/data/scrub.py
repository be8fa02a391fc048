"""PII and secret scrubbing: e-mail addresses, phone numbers, IP addresses, card numbers and
secrets become typed placeholders. Data preparation runs it before the tokenizer is trained
(clean.py); the server runs it, with its own API keys added, over the prompts and completions
it logs under --log_prompts (research/serving/http/endpoints.py).

    scrubber = Scrubber(kinds=KINDS, patterns=(("employee_id", r"EMP-\\d{6}"),))
    text, counts = scrubber.scrub(text)       # counts: {"email": 1, ...}, replacements made

Placeholders: <EMAIL>, <PHONE>, <IP>, <CARD>, <SECRET>; an extra pattern named `name`
becomes <NAME>. Each kind is one regular expression plus, where the expression alone would
catch ordinary numbers, a check in Python (`_keep_*`). Precision matters as much as recall:
dates, times, years, versions, ISBNs, prices, hashes and plain numbers in prose stay.

- email: local@domain.tld (a dotted domain with a 2+ letter top level).
- phone: international (+ country code, 8-15 digits, E.164's maximum), North American
  ((555) 234-5678, 555-234-5678, 555.234.5678: area code and exchange start 2-9, one
  separator throughout), and national numbers with a trunk 0 in two or more groups
  (020 7946 0958, 01 23 45 67 89, 030/1234567: 9-12 digits, one separator, not a date).
  Not matched: 7-digit local numbers (555-1234), numbers without a + or a trunk 0.
- ip: IPv4 (four octets 0-255, not after "version", "v", "section", ...), IPv6 (anything
  Python's ipaddress accepts; a compressed form needs two groups and 4+ hex digits), also
  inside URLs. Loopback, unspecified (0.0.0.0, ::) and netmasks (255.255.255.0) stay.
- card: 13-19 digits, alone or in groups of 4-6 split by spaces or dashes, starting like a
  card network's numbers (`_issued_range`: Visa, Mastercard, Amex, Discover, JCB, Diners,
  UnionPay, Maestro, Mir) and with a valid Luhn check digit. A number failing either stays.
- secret: PEM private-key blocks; AWS access key ids (AKIA..., ASIA...); GitHub tokens
  (ghp_, gho_, ghu_, ghs_, ghr_, github_pat_); OpenAI / Anthropic style sk-...; Stripe
  sk_live_ / rk_test_...; Slack xox?-...; Google API keys (AIza...); JSON Web Tokens;
  `Bearer <token>`; and the value of api_key / access_token / secret / password / token =
  or : assignments when it holds a letter and a digit (prose such as "the secret: silence"
  stays). Only the secret itself is replaced ("Bearer <SECRET>", "api_key=<SECRET>").
"""

import dataclasses
import ipaddress
import re

KINDS = ("email", "phone", "ip", "card", "secret")
PLACEHOLDERS = {kind: f"<{kind.upper()}>" for kind in KINDS}
# Bump when a built-in pattern changes: prepared data keyed by DataConfig is then rebuilt.
VERSION = 1
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

_SECRET = "<SECRET>"
_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|(?:\n[A-Za-z0-9+/=]+)*)",
    re.DOTALL,
)
_TOKENS = re.compile(
    r"\b(?:"
    r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub
    r"|sk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{20,}"  # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-)
    r"|(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}"  # Stripe
    r"|xox[abposre]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JSON Web Token
    r")(?![\w-])"
)
_BEARER = re.compile(r"\b(Bearer\s+)([A-Za-z0-9._~+/=-]{16,})", re.IGNORECASE)
_ASSIGNED = re.compile(
    r"\b((?:api[_-]?key|access[_-]?key|access[_-]?token|auth[_-]?token|refresh[_-]?token"
    r"|secret[_-]?key|client[_-]?secret|private[_-]?key|aws_secret_access_key|password"
    r"|passwd|secret|token)[\"']?\s*[:=]\s*[\"']?)([^\s\"',;]{8,})",
    re.IGNORECASE,
)
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_CARD = re.compile(r"(?<![\w.,+-])[2-6]\d{3}(?:\d{9,15}|(?:[ -]\d{4,6}){2,4})(?![\w-]|[.,]\d)")
_IPV4 = re.compile(
    r"(?<![\w.-])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?![\w-]|\.\d)"
)
_NOT_IP_AFTER = re.compile(
    r"(?:\bv|\b(?:version|release|section|chapter|clause|figure|table|step|rule|no)\.?\s*"
    r"|§\s*)$",
    re.IGNORECASE,
)
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
    r"(?![\w:]|\.\d)"
)
_PHONE = re.compile(
    r"(?<![\w+.,/-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,6}"  # International.
    r"|(?:1[ .-]?)?(?:\([2-9]\d\d\) ?[2-9]\d\d[ .-]|[2-9]\d\d(?P<sep>[ .-])[2-9]\d\d(?P=sep))"
    r"\d{4}"  # North American.
    r"|\(?0\d{1,4}\)?(?:[ ./-]\d{2,8}){1,4}"  # National, trunk 0.
    r")(?![\w]|[.,/-]?\d)"
)
_DATE = re.compile(r"\d{1,2}([./-])\d{1,2}\1\d{2,4}\b")  # 05/06/2024: not a trunk-0 phone.


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of card numbers: doubled every second digit from the right."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char) * (2 if index % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _issued_range(digits: str) -> bool:
    """First digits of a card network: Visa 4, Mastercard 51-55 / 2221-2720, Mir 2200-2204,
    Amex 34 / 37, Diners 30 / 36 / 38 / 39, JCB 35, Maestro 50 / 56-69, Discover and
    UnionPay 6. Years (19xx, 20xx) and most ids do not start like this."""
    head = int(digits[:4])
    if digits[0] == "2":
        return 2200 <= head <= 2204 or 2221 <= head <= 2720
    if digits[0] == "3":
        return digits[1] in "0456789"
    return digits[0] in "456"


def _keep_card(text: str, match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return not (13 <= len(digits) <= 19 and _issued_range(digits) and luhn_valid(digits))


def _generic_address(address) -> bool:
    """Loopback (127.0.0.1, ::1), unspecified (0.0.0.0, ::) and netmasks (255.255.255.0)
    name no machine: configuration text keeps them."""
    if address.is_loopback or address.is_unspecified:
        return True
    value = int(address)
    bits = address.max_prefixlen
    inverted = ~value & ((1 << bits) - 1)
    return value >> (bits - 8) == 0xFF and inverted & (inverted + 1) == 0


def _keep_ipv4(text: str, match: re.Match) -> bool:
    if _NOT_IP_AFTER.search(text[max(0, match.start() - 12) : match.start()]):
        return True
    return _generic_address(ipaddress.IPv4Address(match.group()))


def _keep_ipv6(text: str, match: re.Match) -> bool:
    value = match.group()
    try:
        address = ipaddress.IPv6Address(value)
    except ValueError:
        return True
    if _generic_address(address):
        return True
    if "::" in value:  # "a::b" or "10:30::" are more likely code or times than addresses.
        groups = [group for group in value.split(":") if group]
        return len(groups) < 2 or sum(len(group) for group in groups) < 4
    return False


def _keep_phone(text: str, match: re.Match) -> bool:
    value = match.group()
    digits = sum(char.isdigit() for char in value)
    if value.startswith("+"):
        return not 8 <= digits <= 15
    if value.lstrip("(").startswith("0"):  # One separator throughout, and not a date.
        separators = set(re.findall(r"[ ./-]", value.split(")")[-1].strip()))
        return not 9 <= digits <= 12 or len(separators) > 1 or bool(_DATE.match(value))
    return False  # North American: its shape is specific enough.


def _keep_assigned(text: str, match: re.Match) -> bool:
    value = match.group(2)
    if value.startswith("<") or value.endswith(">"):
        return True  # Already a placeholder (<SECRET>) or a template variable.
    has_letter = any(char.isalpha() for char in value)
    has_digit = any(char.isdigit() for char in value)
    return not (has_letter and has_digit)


def _keep_token(text: str, match: re.Match) -> bool:
    value = match.group()
    return value.startswith("sk-") and not any(char.isdigit() for char in value)


@dataclasses.dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern
    keep: object = None  # (text, match) -> True to leave the match as it is.
    group: int = 0  # The group replaced (0 = the whole match); earlier groups stay.


# In order: secrets first (their digits must not become cards or phones), then e-mail,
# cards before phones (a card's groups look like a phone number's), IPv6 before IPv4 (an
# address may end in IPv4 form), IP addresses before phones.
_RULES = (
    _Rule("secret", _PEM),
    _Rule("secret", _TOKENS, _keep_token),
    _Rule("secret", _BEARER, group=2),
    _Rule("secret", _ASSIGNED, _keep_assigned, group=2),
    _Rule("email", _EMAIL),
    _Rule("card", _CARD, _keep_card),
    _Rule("ip", _IPV6, _keep_ipv6),
    _Rule("ip", _IPV4, _keep_ipv4),
    _Rule("phone", _PHONE, _keep_phone),
)


def compile_patterns(patterns, field: str = "data.scrub_patterns") -> tuple[tuple[str, str], ...]:
    """Checked extra patterns as sorted (name, regex) pairs; ValueError naming `field`.

    patterns: a {name: regex} dict or (name, regex) pairs; names are identifiers (the
    placeholder is <NAME>) other than the built-in kinds.
    """
    items = patterns.items() if isinstance(patterns, dict) else patterns
    checked = {}
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"{field}: {item!r} is not a (name, regex) pair; write {field} = "
                "{'employee_id': 'EMP-[0-9]{6}'}."
            )
        name, regex = item
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in KINDS:
            raise ValueError(
                f"{field}: the name {name!r} must be an identifier (letters, digits, _) other "
                f"than the built-in kinds {KINDS}; it becomes the placeholder <NAME>."
            )
        if not isinstance(regex, str) or not regex:
            raise ValueError(f"{field}[{name!r}]={regex!r} must be a non-empty regex string.")
        try:
            compiled = re.compile(regex)
        except re.error as error:
            raise ValueError(
                f"{field}[{name!r}]={regex!r} is not a valid Python regular expression: "
                f"{error}. Fix the pattern (escape literal characters such as '.', '+', '(')."
            ) from None
        if compiled.fullmatch(""):
            raise ValueError(
                f"{field}[{name!r}]={regex!r} matches the empty string; it must match text."
            )
        checked[name] = regex
    return tuple(sorted(checked.items()))


class Scrubber:
    """Replaces the chosen kinds and extra named patterns by placeholders (module docstring).

    kinds: a subset of KINDS (() = none of the built-ins).
    patterns: extra (name, regex) pairs, applied first; a match becomes <NAME>.
    literals: exact strings replaced by <SECRET> before anything else (a server's API keys).
    """

    def __init__(self, kinds=KINDS, patterns=(), literals=()):
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown:
            raise ValueError(f"unknown scrub kinds {unknown}; the kinds are {KINDS}.")
        extra = [_Rule(name, re.compile(regex)) for name, regex in compile_patterns(patterns)]
        self.rules = tuple(extra) + tuple(rule for rule in _RULES if rule.kind in kinds)
        literals = sorted({literal for literal in literals if literal}, key=len, reverse=True)
        self.literals = re.compile("|".join(map(re.escape, literals))) if literals else None

    @property
    def active(self) -> bool:
        return bool(self.rules or self.literals)

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """(text with placeholders, {kind or pattern name: replacements made})."""
        counts: dict[str, int] = {}
        if self.literals is not None:
            text, count = self.literals.subn(_SECRET, text)
            if count:
                counts["secret"] = count
        for rule in self.rules:
            text = _apply(rule, text, counts)
        return text, counts

    def __call__(self, text: str) -> str:
        return self.scrub(text)[0]

    def redact(self, value):
        """`value` with every string inside it scrubbed (dicts, lists and tuples walked;
        other values kept): prompts, chat messages and completions before they are logged."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {key: self.redact(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact(item) for item in value]
        return value


def add_counts(total: dict, found: dict) -> dict:
    """Adds one scrub's {kind: count} into `total` (in place); returns `total`."""
    for kind, count in found.items():
        total[kind] = total.get(kind, 0) + count
    return total


def describe(counts: dict) -> str:
    """{kind: count} as '2 email, 1 phone' ('nothing' when empty)."""
    return ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items())) or "nothing"


def _apply(rule: _Rule, text: str, counts: dict) -> str:
    placeholder = PLACEHOLDERS.get(rule.kind) or f"<{rule.kind.upper()}>"
    pieces, last, count = [], 0, 0
    for match in rule.pattern.finditer(text):
        if rule.keep is not None and rule.keep(text, match):
            continue
        start = match.start(rule.group)
        pieces += [text[last:start], placeholder]
        last = match.end(rule.group)
        count += 1
    if not count:
        return text
    counts[rule.kind] = counts.get(rule.kind, 0) + count
    return "".join(pieces) + text[last:]
