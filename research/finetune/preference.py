"""Preference pairs for DPO: JSONL prompt / chosen / rejected -> token rows through the chat
template.

One JSON object a line, in any of TRL's preference forms:

    {"prompt": "Hi", "chosen": "Hello!", "rejected": "What?"}                       text
    {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
    {"chosen": [messages..., assistant], "rejected": [messages..., assistant]}      implicit prompt

A text prompt is one user message and a text response the assistant's content. A response
written as a whole conversation that repeats the prompt's messages keeps only its final
assistant message, so the prompt (its system message included) is rendered once.

Tokens (`encode_pairs`): the chosen and the rejected conversation (prompt + response) are each
encoded as chat SFT encodes a conversation (research/data/chat.py `encode_conversation`, loss
on the last assistant turn: its content and end-of-turn token) and end after that end-of-turn
token. The tokens before the response must equal the prompt as the server tokenizes it
(`ChatTemplate.encode`, generation prompt included), in both rows. So the prompt is token for
token the same in the chosen and the rejected row and outside the loss, each row holds the
bos the template writes (once, if it writes one) and one end-of-turn, and DPO scores the
responses the served model would be asked for. Message text that spells a control token
(bos, eos, an end-of-turn or turn marker) is refused, naming the line and the field.

Length: a pair (prompt + its longer response) of more than `seq_len` tokens loses prompt
tokens from the left, after the bos, keeping at least `min_prompt_tokens` of the prompt; a
pair whose response does not fit beside that many is dropped. `EncodeReport` counts both.
"""

import dataclasses
import glob
import hashlib
import io
import os

import numpy as np
from etils import epath

from research.data.chat import ROLES, ChatTemplate, encode_conversation
from research.data.corpus import jsonl_records
from research.errors import UserError

CHOSEN, REJECTED = 0, 1  # Row order within a pair.


@dataclasses.dataclass
class Preference:
    """One checked line: the prompt's messages and the two assistant responses."""

    where: str  # "file:line", for messages.
    prompt: list[dict]
    chosen: dict
    rejected: dict


def read_preferences(sources) -> list[Preference]:
    """Every pair in JSONL files, directories (their *.jsonl, recursively) and globs.

    A UserError names file:line and the field for invalid JSON, a missing or malformed field.
    """
    preferences = []
    for path in _files(sources):
        for where, record in jsonl_records(path):
            preferences.append(_parse(record, where))
    if not preferences:
        raise UserError(f"dpo.data={list(sources)} holds no preference pairs.")
    return preferences


def _files(sources) -> list[str]:
    files = []
    for source in sources:
        path = os.path.expanduser(source)
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
        elif any(char in path for char in "*?["):
            found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            found = [path] if os.path.isfile(path) else []
        if not found:
            raise UserError(
                f"dpo.data entry {source!r} matches no file (working directory "
                f"{os.getcwd()!r}); give preference JSONL files, directories or globs."
            )
        files.extend(found)
    return files


def _parse(record, where: str) -> Preference:
    if not isinstance(record, dict):
        raise UserError(f'{where}: expected an object with "prompt", "chosen" and "rejected".')
    for field in ("chosen", "rejected"):
        if field not in record:
            raise UserError(
                f'{where} has no "{field}" field; a preference pair needs "prompt", "chosen" '
                'and "rejected".'
            )
    chosen = _messages(record["chosen"], where, "chosen", "assistant")
    rejected = _messages(record["rejected"], where, "rejected", "assistant")
    if "prompt" in record:
        prompt = _messages(record["prompt"], where, "prompt", "user")
        chosen, rejected = _after(prompt, chosen), _after(prompt, rejected)
    elif len(chosen) > 1 and chosen[:-1] == rejected[:-1]:  # TRL's implicit prompt.
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    else:
        raise UserError(
            f'{where} has no "prompt" field; without one, "chosen" and "rejected" must be '
            "conversations equal up to their last (assistant) message."
        )
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        if len(response) != 1 or response[0]["role"] != "assistant":
            roles = [m["role"] for m in response]
            raise UserError(
                f'{where}: "{field}" must be one assistant message (or its text); got roles '
                f"{roles}."
            )
    if prompt[-1]["role"] == "assistant":
        raise UserError(
            f'{where}: "prompt" ends with an assistant message; it must end with the turn the '
            "responses answer (user or tool)."
        )
    return Preference(where, prompt, chosen[0], rejected[0])


def _messages(value, where: str, field: str, role: str) -> list[dict]:
    """A field as messages: text becomes one `role` message."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise UserError(
            f'{where}: "{field}" must be a string or a non-empty list of {{role, content}} '
            "messages."
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise UserError(f'{where}: "{field}"[{i}] is not an object with role and content.')
        if message.get("role") not in ROLES:
            raise UserError(
                f'{where}: "{field}"[{i}].role={message.get("role")!r} is not one of {ROLES}.'
            )
        if not isinstance(message.get("content"), str):
            raise UserError(f'{where}: "{field}"[{i}].content must be a string.')
        messages.append(dict(message))
    return messages


def _after(prompt: list[dict], response: list[dict]) -> list[dict]:
    """A response that repeats the prompt's messages first, without them."""
    if len(response) > len(prompt) and response[: len(prompt)] == prompt:
        return response[len(prompt) :]
    return response


@dataclasses.dataclass
class PreferencePairs:
    """N encoded pairs: a chosen (row 0) and a rejected (row 1) sequence sharing one prompt.

    Attributes:
      tokens: [N, 2, L] int32, prompt then response, 0 after each row's end (L = seq_len + 1,
        so inputs and targets are seq_len long).
      lengths: [N, 2] int32 tokens in each row.
      prompt_lengths: [N] int32 tokens of the shared prompt (the first response token's index).
      where: "file:line" of each pair.
      reference: [N, 2] float32, the reference model's log-probability of each response
        (summed over its tokens), or None before it is computed.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    where: list[str]
    reference: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, indices) -> "PreferencePairs":
        indices = np.asarray(indices, np.int64)
        return PreferencePairs(
            tokens=self.tokens[indices],
            lengths=self.lengths[indices],
            prompt_lengths=self.prompt_lengths[indices],
            where=[self.where[i] for i in indices],
            reference=None if self.reference is None else self.reference[indices],
        )

    def fingerprint(self) -> str:
        """A hash of the tokens (not the reference): equal pairs give equal fingerprints."""
        digest = hashlib.sha256()
        for array in (self.tokens, self.lengths, self.prompt_lengths):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def save(self, path, key: str) -> None:
        """Writes the pairs and their reference log-probs to `path` (.npz; local, gs://, s3://)."""
        if self.reference is None:
            raise ValueError("save: compute the reference log-probs first.")
        buffer = io.BytesIO()
        arrays = dict(tokens=self.tokens, lengths=self.lengths, prompt_lengths=self.prompt_lengths)
        np.savez(buffer, **arrays, reference=self.reference, where=np.array(self.where), key=key)
        epath.Path(path).write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path, key: str) -> "PreferencePairs | None":
        """The pairs saved at `path` under `key`, or None (no file, or another key)."""
        path = epath.Path(path)
        if not path.exists():
            return None
        with np.load(io.BytesIO(path.read_bytes())) as saved:
            if str(saved["key"]) != key:
                return None
            return cls(
                tokens=saved["tokens"],
                lengths=saved["lengths"],
                prompt_lengths=saved["prompt_lengths"],
                where=[str(w) for w in saved["where"]],
                reference=saved["reference"],
            )


@dataclasses.dataclass
class EncodeReport:
    """What `encode_pairs` kept and dropped, and why."""

    pairs: int = 0
    kept: int = 0
    truncated: int = 0  # Prompts cut from the left to fit.
    too_long: int = 0  # Dropped: the longer response leaves too little room for the prompt.
    identical: int = 0  # Dropped: chosen and rejected are the same tokens.
    mismatched: int = 0  # Dropped: the prompt tokenizes differently inside the conversation.
    first_mismatch: str = ""

    def describe(self) -> str:
        text = (
            f"{self.kept} of {self.pairs} pairs kept ({self.truncated} prompts cut from the "
            f"left to fit); dropped: {self.too_long} whose response does not fit, "
            f"{self.identical} with identical responses, {self.mismatched} whose prompt "
            "tokenizes differently inside the conversation"
        )
        return text + (f" (first: {self.first_mismatch})" if self.first_mismatch else "")


def encode_pairs(
    template: ChatTemplate, preferences, *, seq_len: int, min_prompt_tokens: int = 32
) -> tuple[PreferencePairs, EncodeReport]:
    """Token rows of each pair (see the module docstring); pairs that cannot be used are
    dropped and counted in the report."""
    controls = template.control_texts
    bos_id = template.tokenizer.bos_id
    report = EncodeReport(pairs=len(preferences))
    kept = []
    for preference in preferences:
        _check_controls(preference, controls)
        prompt_ids = template.encode(preference.prompt)
        responses = [
            _response_ids(template, preference, response, prompt_ids)
            for response in (preference.chosen, preference.rejected)
        ]
        if any(r is None for r in responses):
            report.mismatched += 1
            report.first_mismatch = report.first_mismatch or preference.where
            continue
        if responses[CHOSEN] == responses[REJECTED]:
            report.identical += 1
            continue
        room = seq_len - max(len(r) for r in responses)
        if room < min(len(prompt_ids), min_prompt_tokens):
            report.too_long += 1
            continue
        if len(prompt_ids) > room:
            prompt_ids = _cut_left(prompt_ids, room, bos_id)
            report.truncated += 1
        kept.append((preference.where, prompt_ids, responses))
    report.kept = len(kept)
    tokens = np.zeros((len(kept), 2, seq_len + 1), np.int32)
    lengths = np.zeros((len(kept), 2), np.int32)
    prompt_lengths = np.zeros(len(kept), np.int32)
    for index, (_, prompt_ids, responses) in enumerate(kept):
        prompt_lengths[index] = len(prompt_ids)
        for row, response in enumerate(responses):
            sequence = prompt_ids + response
            tokens[index, row, : len(sequence)] = sequence
            lengths[index, row] = len(sequence)
    pairs = PreferencePairs(tokens, lengths, prompt_lengths, [where for where, _, _ in kept])
    return pairs, report


def _check_controls(preference: Preference, controls) -> None:
    fields = [(f"prompt message {i}", m["content"]) for i, m in enumerate(preference.prompt)]
    fields += [("chosen", preference.chosen["content"])]
    fields += [("rejected", preference.rejected["content"])]
    for field, text in fields:
        for control in controls:
            if control in text:
                raise UserError(
                    f'{preference.where}: "{field}" contains {control!r}, a control token '
                    "that the chat template writes itself (a second one would be a duplicated "
                    "bos / end-of-turn); remove it from the data."
                )


def _response_ids(template, preference: Preference, response: dict, prompt_ids: list):
    """The response's tokens through its end-of-turn, as encoded in the whole conversation,
    or None when the tokens before them are not exactly `prompt_ids`."""
    try:
        ids, loss = encode_conversation(template, [*preference.prompt, response], mask="last")
    except ValueError as error:
        raise UserError(f"{preference.where}: {error}") from None
    in_loss = np.flatnonzero(loss)
    if not in_loss.size:
        return None
    first, last = int(in_loss[0]), int(in_loss[-1])
    if ids[:first].tolist() != prompt_ids or last - first + 1 != in_loss.size:
        return None
    return ids[first : last + 1].tolist()


def _cut_left(prompt_ids: list, keep: int, bos_id: int) -> list:
    """The prompt's last tokens, `keep` in all, after its bos if it starts with one."""
    lead = prompt_ids[:1] if prompt_ids and prompt_ids[0] == bos_id else []
    return lead + prompt_ids[len(prompt_ids) - (keep - len(lead)) :]
