"""``data:`` the prompt sources, their rewards and the LLM judge."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from ..rewards.registry import REWARDS
from .base import fmt, knob, section
from .rollout import SGLangLaunchConfig

# Names label metrics (``rollout/<name>/...``, TensorBoard tags) and prompt ids.
SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
FIELDS = ("question", "answer", "solution")

JUDGE_TEMPLATES = {
    "yes_no": (
        "You are grading a response to a problem against the reference.\n\n"
        "Problem:\n{question}\n\n"
        "Reference answer:\n{answer}\n\n"
        "Reference solution:\n{solution}\n\n"
        "Response to grade:\n{response}\n\n"
        "Is the response's final answer correct, that is, equivalent to the reference answer? "
        "Reason briefly, then end with one line that reads exactly `Verdict: yes` or "
        "`Verdict: no`."),
    "score": (
        "You are grading a response to a problem against the reference.\n\n"
        "Problem:\n{question}\n\n"
        "Reference answer:\n{answer}\n\n"
        "Reference solution:\n{solution}\n\n"
        "Response to grade:\n{response}\n\n"
        "Rate how correct and complete the response is, from 0 (wrong) to {max_score} "
        "(fully correct). Reason briefly, then end with one line that reads exactly "
        "`Score: N` with N between 0 and {max_score}."),
}


@dataclass
class JudgeConfig:
    backend: str = knob("openai", "`openai`: an OpenAI-compatible /v1/chat/completions "
                                  "endpoint through the official `openai` client (SGLang, vLLM, "
                                  "a hosted API); `sglang`: SGLang's native /generate through our "
                                  "client", choices=["openai", "sglang"])
    urls: list[str] = knob(default_factory=list, help=(
        "Judge servers. `openai`: base URLs ending in /v1; `sglang`: server or sglang-router "
        "URLs. Requests are spread over them and a failed attempt moves to the next"))
    model: str = knob("default", "Model name sent with each request (SGLang ignores it)")
    api_key_env: Optional[str] = knob(
        "REPO_MEGATRON_JUDGE_API_KEY", "Environment variable holding the judge's API key "
                                       "(sent as a Bearer token; unset = no key)")
    tokenizer: Optional[str] = knob(
        None, "`sglang` backend: Hugging Face tokenizer (directory or name) whose chat template "
              "wraps the messages; null sends the prompt text as it is")
    template: Optional[str] = knob(
        None, "Judge prompt; {question}, {answer}, {solution}, {response} (and {max_score}) are "
              "filled in. null = our default for `verdict`")
    system_prompt: Optional[str] = knob(None, "System message of every judge request")
    verdict: str = knob("yes_no", "`yes_no`: reward 1 for `Verdict: yes`, 0 for `no`; `score`: "
                                  "reward = (`Score: N`) / max_score",
                        choices=["yes_no", "score"])
    max_score: float = knob(10.0, "Top of the `score` scale", gt=0)
    temperature: float = knob(0.0, "Judge sampling temperature (0 = greedy, cacheable)", ge=0)
    max_tokens: int = knob(1024, "Longest judge answer", ge=1)
    timeout_s: float = knob(120.0, "Per attempt; an attempt that takes longer fails", gt=0)
    max_retries: int = knob(2, "Extra attempts after a connection error, timeout, 429 or 5xx "
                               "(each on the next URL, with exponential backoff)", ge=0)
    retry_backoff_s: float = knob(0.5, "Wait before the first retry (doubles each time)", ge=0)
    max_concurrency: int = knob(64, "Judge requests in flight at once", ge=1)
    cache_size: int = knob(65536, "Answers of identical requests kept (0 = no cache)", ge=0)
    launch: SGLangLaunchConfig = section(
        SGLangLaunchConfig, "Judge servers started by repo-megatron (like rollout.sglang.launch: "
                            "`repo-megatron serve` on a CPU, an SGLang pool by srun); their URLs "
                            "(or the router's) are used instead of `urls`. Give them ports of "
                            "their own (base_port, router_port)")

    def prompt_template(self) -> str:
        return self.template if self.template is not None else JUDGE_TEMPLATES[self.verdict]

    def validate(self, path: str) -> None:
        if "{response}" not in self.prompt_template():
            raise ConfigError(f"{path}.template must contain {{response}}")

    @property
    def configured(self) -> bool:
        """Whether there is a judge to ask: URLs, or servers to start."""
        return bool(self.urls) or self.launch.num_servers > 0


@dataclass
class SourceConfig:
    name: Optional[str] = knob(
        None, "Label of the source in metrics (rollout/<name>/...) and prompt ids; default: the "
              "file's stem or the dataset's name")
    path: Optional[str] = knob(None, "Local .jsonl or .parquet file (or set `dataset`)",
                               path="input")
    dataset: Optional[str] = knob(
        None, "Hugging Face dataset: a Hub name (from the local cache when offline) or a local "
              "dataset directory, read with datasets.load_dataset")
    subset: Optional[str] = knob(None, "Configuration name of `dataset` (load_dataset's `name`)")
    split: str = knob("train", "Split of `dataset`")
    weight: float = knob(1.0, "Relative sampling weight: each prompt comes from this source "
                              "with probability weight / sum of weights", gt=0)
    reward: Optional[str] = knob(None, "Reward of this source's prompts (null = data.reward)")
    fields: dict = knob(default_factory=dict, help=(
        "Columns of this source: {question: COL, answer: COL, solution: COL or null}; a field "
        "left out uses data.question_key / answer_key / solution_key"))

    def validate(self, path: str) -> None:
        if (self.path is None) == (self.dataset is None):
            raise ConfigError(f"{path}: set exactly one of path and dataset "
                              f"(got path={fmt(self.path)}, dataset={fmt(self.dataset)})")
        if self.name is not None and not SOURCE_NAME.fullmatch(self.name):
            raise ConfigError(f"{path}.name={fmt(self.name)} may use only letters, digits, "
                              f"'_', '.' and '-'")
        for key, column in self.fields.items():
            if key not in FIELDS:
                raise ConfigError(f"{path}.fields.{key} is not a field (fields: "
                                  f"{', '.join(FIELDS)})")
            if not (isinstance(column, str) or (key == "solution" and column is None)):
                raise ConfigError(f"{path}.fields.{key}={fmt(column)} must be a column name")


@dataclass
class FewShotExample:
    user: str = knob("", "The example's question, as a user turn")
    assistant: str = knob("", "The answer in the style the policy should write, as an "
                              "assistant turn")

    def validate(self, path: str) -> None:
        for key in ("user", "assistant"):
            if not getattr(self, key).strip():
                raise ConfigError(f"{path}.{key} is empty: a few-shot example needs both turns")


@dataclass
class DataConfig:
    path: Optional[str] = knob(None, "Local .jsonl or .parquet file of prompts (the one-source "
                                     "shorthand of `sources`)", path="input")
    sources: list[SourceConfig] = knob(default_factory=list, help=(
        "Weighted mixture of prompt sources (instead of `path`): each prompt is drawn from a "
        "source chosen by weight, in an order fixed by the seed and resumed exactly"))
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
    few_shot: list[FewShotExample] = knob(default_factory=list, help=(
        "Worked examples put before every prompt (rollouts, rephrases, eval) as earlier "
        "user/assistant turns of the chat (without a chat template: as plain text). They set "
        "the answer's format; a small model follows them better than a system message"))
    max_prompt_tokens: int = knob(1024, "Longer prompts are rejected with an error", ge=1)
    reward: str = knob("math", "Registered reward ("
                       + ", ".join(f"`{name}`" for name in REWARDS.builtins)
                       + "), `judge` (an LLM judge: data.judge) or `module:function`")
    reward_timeout_s: float = knob(10.0, "A reward call that takes longer scores 0 (its worker "
                                         "process is killed and replaced)", gt=0)
    reward_workers: int = knob(2, "Processes that score rewards (a hung reward blocks only "
                                  "its own worker)", ge=1)
    reward_max_abs: float = knob(1e6, "A reward that is not a finite number within +-this is "
                                      "a failed reward (value 0, reason logged)", gt=0)
    max_failed_reward_steps: int = knob(
        3, "Stop the run with an error when every reward call failed in this many steps in "
           "a row (0 = never): a broken reward would otherwise train on zeros", ge=0)
    judge: JudgeConfig = section(JudgeConfig, "The LLM judge of `reward: judge`")

    def rewards(self) -> list[str]:
        """Every reward the run uses (data.reward and each source's)."""
        named = [s.reward or self.reward for s in self.sources]
        return list(dict.fromkeys(named or [self.reward]))

    def validate(self, path: str) -> None:
        if self.path is not None and self.sources:
            raise ConfigError(f"{path}.path={fmt(self.path)} and {path}.sources are exclusive "
                              f"(path is the one-source shorthand)")
        check_source_names(self.sources, path)
        if "judge" in self.rewards() and not self.judge.configured:
            raise ConfigError(f"{path}.judge.urls=[]: reward judge needs judge servers (set "
                              f"{path}.judge.urls or {path}.judge.launch.num_servers)")


def source_name(source: SourceConfig) -> str:
    """``name``, else the file's stem or the dataset's last path part (as a valid name)."""
    if source.name is not None:
        return source.name
    base = os.path.basename((source.path or source.dataset or "").rstrip("/"))
    stem = os.path.splitext(base)[0] if source.path else base
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "source"


def check_source_names(sources: list[SourceConfig], path: str = "data") -> list[str]:
    """The sources' names; two sources with one name are an error naming the second."""
    names: list[str] = []
    for i, source in enumerate(sources):
        name = source_name(source)
        if name in names:
            raise ConfigError(f"{path}.sources[{i}].name={name} is also the name of "
                              f"{path}.sources[{names.index(name)}]: names label metrics and "
                              f"prompt ids, give each source its own")
        names.append(name)
    return names


