"""``data:`` the prompt dataset and the reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import knob


@dataclass
class DataConfig:
    path: Optional[str] = knob(None, "Local .jsonl or .parquet file of prompts", path="input")
    question_key: str = knob("question", "Column with the problem")
    answer_key: str = knob("answer", "Column with the reference answer")
    solution_key: Optional[str] = knob(
        "solution", "Column with an expert's worked solution (off-policy knowledge k); null = none")
    eval_path: Optional[str] = knob(None, "Held-out prompts to measure the solve rate on",
                                    path="input")
    eval_interval: int = knob(0, "Measure the solve rate on eval_path every N steps (0 = at "
                                 "the start and the end only)", ge=0)
    eval_max_prompts: int = knob(64, "Evaluate on at most this many eval prompts", ge=1)
    shuffle: bool = knob(True, "Shuffle prompts every epoch")
    apply_chat_template: bool = knob(True, "Wrap prompts in the tokenizer's chat template")
    system_prompt: Optional[str] = knob(None, "System message for the chat template")
    max_prompt_tokens: int = knob(1024, "Longer prompts are rejected with an error", ge=1)
    reward: str = knob("math", "Registered reward (`math`, `exact`) or `module:function`")
    reward_timeout_s: float = knob(10.0, "A reward call that takes longer scores 0 (its worker "
                                         "process is killed and replaced)", gt=0)
    reward_workers: int = knob(2, "Processes that score rewards (a hung reward blocks only "
                                  "its own worker)", ge=1)
    reward_max_abs: float = knob(1e6, "A reward that is not a finite number within +-this is "
                                      "a failed reward (value 0, reason logged)", gt=0)
    max_failed_reward_steps: int = knob(
        3, "Stop the run with an error when every reward call failed in this many steps in "
           "a row (0 = never): a broken reward would otherwise train on zeros", ge=0)
