"""A logged program built back from its code and DSPy's JSON state (mlflow_dspy/artifact): what the recipe and the
state hold (no endpoint, no key), building a program from a model folder's own code, the checks `log` makes
before it writes a recipe, and each version running its own code. In process, no LM call; the servers that load
this way are in test_pickle_free_e2e.py."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import dspy
import pytest
from dspy.utils.dummies import DummyLM

from mlflow_dspy.artifact import recipe as recipes
from mlflow_dspy.artifact.lm import API_BASE_ENV, LMSpecProblem, adapter_spec, lm_from_spec, lm_spec
from mlflow_dspy.lm_engine import select
from mlflow_dspy.lm_engine.openai_http import OpenAIHTTPEngine
from mlflow_dspy.program.mapping import ChatMapping

pytestmark = pytest.mark.unit

EVIL = "http://attacker.example:9/v1"
PLANTED = "sk-planted-5b0c2e"

PROGRAM = '''
import dspy


class Ask(dspy.Signature):
    """Answer the question in one word."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Asker(dspy.Module):
    def __init__(self):
        super().__init__()
        self.ask = dspy.Predict(Ask)

    def forward(self, question: str):
        return self.ask(question=question)


def build():
    return Asker()
'''


def test_the_lms_spec_names_no_endpoint_and_no_key_and_serving_names_the_server(monkeypatch):
    lm = select.build_lm("openai/stub-echo", "http://user:pw@127.0.0.1:9/v1?api_key=x")
    lm.kwargs["api_key"] = PLANTED
    spec, why = lm_spec(lm)
    assert why == "" and spec["endpoint"] == "custom" and spec["engine"]["kind"] == "openai-http"
    text = json.dumps(spec)
    assert PLANTED not in text and "127.0.0.1" not in text and "api_base" not in text
    # DSPy's own route: its endpoint and secret headers are left out too.
    other = select.build_lm("anthropic/claude-x", EVIL)
    other.kwargs["extra_headers"] = {"X-Api-Key": PLANTED, "X-Trace": "on"}
    other_spec, _ = lm_spec(other)
    assert other_spec["endpoint"] == "custom" and "attacker" not in json.dumps(other_spec)
    assert PLANTED not in json.dumps(other_spec) and other_spec["kwargs"]["extra_headers"] == {"X-Trace": "on"}

    monkeypatch.delenv(API_BASE_ENV, raising=False)
    with pytest.raises(LMSpecProblem, match=f"set {API_BASE_ENV}"):  # never api.openai.com with the key instead
        lm_from_spec(spec)
    monkeypatch.setenv(API_BASE_ENV, "http://127.0.0.1:7/v1")
    built = lm_from_spec(spec)
    assert isinstance(built.engine, OpenAIHTTPEngine) and built.engine.api_base == "http://127.0.0.1:7/v1"
    assert built.model == "openai/stub-echo" and built.num_retries == lm.num_retries and built.cache is False
    assert API_BASE_ENV == select.API_BASE_ENV


def test_an_lm_or_adapter_it_cannot_describe_has_no_spec():
    assert lm_spec(DummyLM([{"answer": "x"}]))[0] is None
    assert "DummyLM" in lm_spec(DummyLM([{"answer": "x"}]))[1]
    assert adapter_spec(dspy.JSONAdapter()) == ("JSONAdapter", "")
    assert adapter_spec(None) == (None, "")

    class Mine(dspy.ChatAdapter):
        pass

    assert adapter_spec(Mine())[0] is None and "Mine" in adapter_spec(Mine())[1]


def test_the_state_of_a_predictors_own_lm_keeps_no_endpoint_and_no_key():
    program = dspy.ChainOfThought("question -> answer")
    program.predict.lm = dspy.LM("openai/x", api_base=EVIL, base_url=EVIL, api_key=PLANTED, cache=False,
                                 extra_headers={"Authorization": f"Bearer {PLANTED}"})
    state = recipes.program_state(program)
    text = json.dumps(state)
    assert "attacker" not in text and PLANTED not in text
    assert state["predict"]["lm"]["model"] == "openai/x"


def model_folder(tmp_path: Path, name: str, source: str = PROGRAM) -> Path:
    """A model folder as `log` leaves it, with a module `name` in its code/ (never imported by this process yet)."""
    folder = tmp_path / name
    (folder / "code").mkdir(parents=True)
    (folder / "code" / f"{name}.py").write_text(textwrap.dedent(source))
    return folder


def plan_from(folder: Path, name: str, program: dspy.Module | None = None, lm=None):
    """What `log` plans for `name:build` (built from the folder's own code here, as from the user's project)."""
    module = recipes.import_from(folder / "code", name)
    program = program or module.build()
    return recipes.plan(program, f"{name}:build", module.build, ChatMapping.of(program), (None, None, None),
                        lm or select.build_lm("openai/stub-echo", "http://127.0.0.1:9/v1"), None)


def test_a_program_is_built_from_its_models_code_and_state_with_its_demos_and_lm(tmp_path, monkeypatch):
    name = "np_compiled_asker"
    folder = model_folder(tmp_path, name)
    compiled = recipes.import_from(folder / "code", name).build()
    compiled.ask.demos = [dspy.Example(question="Capital of France?", answer="Paris")]
    compiled.ask.signature = compiled.ask.signature.with_instructions("Answer in one word, politely.")
    planned, why = plan_from(folder, name, compiled)
    assert why == "" and planned.recipe.build == f"{name}:build" and not planned.recipe.files
    recipes.write(folder, planned)
    assert json.loads((folder / recipes.STATE_FILE).read_text())["ask"]["demos"][0]["answer"] == "Paris"

    monkeypatch.setenv(API_BASE_ENV, "http://127.0.0.1:7/v1")
    built = recipes.build(folder, "models:/np/1")
    program = built.chat.program
    assert type(program).__name__ == "Asker" and program is not compiled
    assert program.ask.demos[0]["answer"] == "Paris"
    assert program.ask.signature.instructions == "Answer in one word, politely."
    assert built.chat.mapping == ChatMapping.of(compiled)
    assert built.lm.model == "openai/stub-echo" and built.adapter is None


def test_log_keeps_the_pickle_alone_for_a_program_it_cannot_build_again(tmp_path):
    name = "np_unbuildable"
    folder = model_folder(tmp_path, name)
    program = recipes.import_from(folder / "code", name).build()
    mapping = ChatMapping.of(program)
    lm = select.build_lm("openai/stub-echo", "http://127.0.0.1:9/v1")
    # No reference to build it from (a program object built with arguments).
    assert recipes.plan(program, None, None, mapping, (None, None, None), lm, None)[0] is None
    # An LM that is not a dspy.LM.
    planned, why = plan_from(folder, name, lm=DummyLM([{"answer": "x"}]))
    assert planned is None and "DummyLM" in why
    # A reference that builds another program than the one logged: of another class, of other parts.
    other = type("Other", (type(program),), {})()
    planned, why = recipes.plan(program, f"{name}:build", lambda: other, mapping, (None, None, None), lm, None)
    assert planned is None and "differs" in why
    other = dspy.Predict("question -> answer, confidence: float")
    planned, why = recipes.plan(program, f"{name}:build", lambda: other, mapping, (None, None, None), lm, None)
    assert planned is None and "loading its state failed" in why
    # A builder that fails.
    planned, why = recipes.plan(program, f"{name}:build", lambda: 1 / 0, mapping, (None, None, None), lm, None)
    assert planned is None and "ZeroDivisionError" in why


def test_a_model_whose_program_reads_chats_differently_now_is_refused(tmp_path, monkeypatch):
    name = "np_changed_mapping"
    folder = model_folder(tmp_path, name)
    planned, _ = plan_from(folder, name)
    recipes.write(folder, planned)
    recorded = json.loads((folder / recipes.RECIPE_FILE).read_text())
    recorded["mapping"]["answer_fields"] = ["reply"]
    (folder / recipes.RECIPE_FILE).write_text(json.dumps(recorded))
    monkeypatch.setenv(API_BASE_ENV, "http://127.0.0.1:7/v1")
    with pytest.raises(recipes.ArtifactProblem, match="chat mapping changed"):
        recipes.build(folder, "models:/np/1")


def test_a_program_with_files_of_its_own_is_built_from_them(tmp_path, monkeypatch):
    name = "np_with_files"
    folder = model_folder(tmp_path, name, PROGRAM + textwrap.dedent('''
        import json


        class Indexed(Asker):
            def __init__(self, words):
                super().__init__()
                self.words = words

            def save_files(self, folder):
                (folder / "words.json").write_text(json.dumps(self.words))

            @classmethod
            def from_files(cls, folder):
                return cls(json.loads((folder / "words.json").read_text()))
        '''))
    module = recipes.import_from(folder / "code", name)
    program = module.Indexed(["alpha", "beta"])
    lm = select.build_lm("openai/stub-echo", "http://127.0.0.1:9/v1")
    planned, why = recipes.plan(program, None, None, ChatMapping.of(program), (None, None, None), lm, None)
    assert why == "" and planned.recipe.files and planned.recipe.build == f"{name}:Indexed"
    recipes.write(folder, planned)
    assert json.loads((folder / recipes.FILES_DIR / "words.json").read_text()) == ["alpha", "beta"]
    monkeypatch.setenv(API_BASE_ENV, "http://127.0.0.1:7/v1")
    assert recipes.build(folder, "models:/np/1").chat.program.words == ["alpha", "beta"]


def test_each_version_is_built_from_its_own_code(tmp_path, monkeypatch):
    """Two versions of one program whose code differs, loaded one after the other into one process (a gateway
    following an alias): each builds from its own code/, not from the module the first one imported."""
    name = "np_versioned"
    monkeypatch.setenv(API_BASE_ENV, "http://127.0.0.1:7/v1")
    built = []
    for version, instructions in (("1", "Answer in one word."), ("2", "Answer in two words.")):
        folder = model_folder(tmp_path / version, name, PROGRAM.replace("Answer the question in one word.",
                                                                        instructions))
        planned, why = plan_from(folder, name)
        assert why == ""
        recipes.write(folder, planned)
        built.append(recipes.build(folder, f"models:/np/{version}").chat.program)
    assert [b.ask.signature.instructions for b in built] == ["Answer in one word.", "Answer in two words."]
    assert Path(sys.modules[name].__file__).parent == tmp_path / "2" / name / "code"


def test_the_loader_a_model_carries_imports_only_what_the_model_carries():
    """`mlflow models serve` imports the artifact's loader from the model's code/ (where mlflow-dspy may not be
    installed): it may use the rooms that travel with it, and nothing above them."""
    from mlflow_dspy.packaging.log import RUNTIME_PARTS
    from tests.test_layers import PACKAGE, imports, room_of

    assert "artifact" in RUNTIME_PARTS
    carried = {part for part in RUNTIME_PARTS if not part.endswith(".py")}
    for path in (PACKAGE / "artifact").rglob("*.py"):
        assert {room_of(m) for m in imports(path)} <= {None, *carried}, path
