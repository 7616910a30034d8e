"""The internal form every source is converted to: an optional system prompt and turns."""

import dataclasses

from csft_jax.data.errors import RecordError

USER = "user"
ASSISTANT = "assistant"
SYSTEM = "system"


@dataclasses.dataclass(frozen=True)
class Conversation:
  """A system prompt (or None) and alternating (role, text) turns.

  Turns start with a user turn and end with an assistant turn, so that every
  conversation has something to train on.
  """

  system: str | None
  turns: tuple[tuple[str, str], ...]

  def __post_init__(self):
    if not self.turns:
      raise RecordError("conversation has no turns")
    for i, (role, text) in enumerate(self.turns):
      expected = USER if i % 2 == 0 else ASSISTANT
      if role != expected:
        raise RecordError(
          f"turn {i} has role {role!r} but turns must alternate"
          f" user/assistant starting with user; got roles"
          f" {[r for r, _ in self.turns]}"
        )
      if not isinstance(text, str):
        raise RecordError(f"turn {i} ({role}) is {type(text).__name__}, not text")
    if self.turns[-1][0] != ASSISTANT:
      raise RecordError(
        f"conversation ends on a user turn (turn {len(self.turns) - 1}):"
        " there is no assistant answer to train on; drop the trailing user"
        " message or add its answer"
      )

  def messages(self) -> list[dict[str, str]]:
    """Returns OpenAI-style messages `[{"role", "content"}, ...]`."""
    messages = [{"role": SYSTEM, "content": self.system}] if self.system else []
    return messages + [{"role": r, "content": t} for r, t in self.turns]

  def text(self) -> str:
    """All text of the conversation, for n-gram checks."""
    return "\n".join(([self.system] if self.system else []) + [t for _, t in self.turns])


def from_messages(messages: list[dict[str, str]]) -> Conversation:
  """Builds a conversation from messages whose optional first one is the system."""
  system = None
  if messages and messages[0].get("role") == SYSTEM:
    system, messages = messages[0]["content"], messages[1:]
  return Conversation(system, tuple((m["role"], m["content"]) for m in messages))
