"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) on AttnRes, block and full mode.

The suite comes from the sdist of the installed transformers release (see tests/transformers_common.py: the only
network access of the test suite, once, then cached). The harness follows transformers' `CausalLMModelTester` /
`CausalLMModelTest` (tests/causal_lm_tester.py, which the sdist does not ship): the same tiny-model tester drives
`AttnResModel`/`AttnResForCausalLM` in block and in full mode and, as the reference, `LlamaModel`/`LlamaForCausalLM`
(transformers' own LlamaModelTest is not in the sdist either). Whatever fails for AttnRes but not for Llama under
this harness is skipped below by name, with the reason.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_transformers_common.py
"""

from __future__ import annotations

import re
import tempfile
import unittest
import warnings

import pytest

import transformers_common

try:
    transformers_common.import_path()
except transformers_common.Unavailable as e:
    pytest.skip(f"transformers' common model tests are not available: {e}", allow_module_level=True)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

with warnings.catch_warnings():  # transformers registers its own marks (flash_attn_test, ...) in its conftest
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from transformers_tests.generation.test_utils import GenerationTesterMixin
    from transformers_tests.test_configuration_common import ConfigTester
    from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, torch_device

from hf_attnres import AttnResConfig, AttnResForCausalLM, AttnResModel  # noqa: E402

# The generate tests (tests/generation/test_utils.py) are not in the sdist: run them if a release ships them.
GENERATION = (GenerationTesterMixin,) if transformers_common.generation_mixin_available() else ()


@pytest.fixture(scope="module", autouse=True)
def _attnres_in_auto_mapping_names():
    """The harness finds base models and causal LMs by class name in these tables (e.g. to add `labels`):
    list AttnRes there while this module runs, as if it were a model of transformers."""
    added = [(modeling_auto.MODEL_MAPPING_NAMES, AttnResModel.__name__),
             (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, AttnResForCausalLM.__name__)]
    key = AttnResConfig.model_type
    old = [table.get(key) for table, _ in added]
    for table, name in added:
        table[key] = name
    yield
    for (table, _), previous in zip(added, old):
        if previous is None:
            table.pop(key, None)
        else:
            table[key] = previous


class CausalLMTester:
    """The tiny model and inputs of transformers' `CausalLMModelTester` (same defaults), for any Llama-like config
    class; `config_overrides` adds the AttnRes fields. Two decoder layers, as transformers demands of every tester
    (`test_num_layers_is_small`): four sublayers, enough for several blocks in block mode."""

    def __init__(self, parent, config_class, base_model_class, causal_lm_class, config_overrides=None,
                 batch_size=13, seq_length=7, num_hidden_layers=2):
        self.parent = parent
        self.config_class, self.base_model_class, self.causal_lm_class = config_class, base_model_class, causal_lm_class
        self.all_model_classes = [base_model_class, causal_lm_class]
        self.config_overrides = dict(config_overrides or {})
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.use_input_mask = True
        self.use_labels = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = 2
        self.num_key_value_heads = 2
        self.intermediate_size = 37
        self.hidden_act = "gelu"
        self.max_position_embeddings = 512
        self.initializer_range = 0.02
        self.type_sequence_label_size = 2
        self.num_labels = 3
        self.num_choices = 4
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.tie_word_embeddings = False

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings, initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            head_dim=self.head_dim, tie_word_embeddings=self.tie_word_embeddings, **self.config_overrides,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = torch.tril(torch.ones_like(input_ids).to(torch_device)) if self.use_input_mask else None
        sequence_labels = token_labels = choice_labels = None
        if self.use_labels:
            sequence_labels = ids_tensor([self.batch_size], self.type_sequence_label_size)
            token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels)
            choice_labels = ids_tensor([self.batch_size], self.num_choices)
        return self.get_config(), input_ids, None, input_mask, sequence_labels, token_labels, choice_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, _, input_mask, _, _, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, token_type_ids, input_mask, *labels):
        model = self.base_model_class(config=config).to(torch_device).eval()
        model(input_ids, attention_mask=input_mask)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))


class CausalLMCommonTest(ModelTesterMixin, *GENERATION):
    """`CausalLMModelTest` of transformers, less the pipeline and sequence/token-classification tests (AttnRes has no
    such heads)."""

    config_class = base_model_class = causal_lm_class = None
    config_overrides: dict = {}
    # test name (without a parameterized suffix) -> why it is skipped for this class
    skipped: dict[str, str] = {}
    # skipped for every class (Llama too): what the harness itself can't do
    harness_skipped: dict[str, str] = {} if GENERATION else {
        "test_generation_tester_mixin_inheritance": (
            "GenerationTesterMixin (tests/generation/test_utils.py) is not in the transformers sdist: the stand-in "
            "can't be inherited to run the generate tests, which this test demands of every model that can generate"
        ),
    }

    def setUp(self):
        name = self._testMethodName
        for test, reason in {**self.harness_skipped, **self.skipped}.items():
            if re.fullmatch(re.escape(test) + r"(_\d+(_\w*)?)?", name):  # with parameterized.expand's suffixes
                self.skipTest(reason)
        self.model_tester = CausalLMTester(self, self.config_class, self.base_model_class, self.causal_lm_class,
                                           self.config_overrides)
        self.config_tester = ConfigTester(self, config_class=self.config_class, **self.config_overrides)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs()
        self.model_tester.create_and_check_model(*config_and_inputs)

    def test_causal_lm_can_accept_training_kwargs(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        with tempfile.TemporaryDirectory() as tmpdir:
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmpdir)
            model = AutoModelForCausalLM.from_pretrained(tmpdir, dtype=torch.float32, device_map=torch_device)
            self.assertIsInstance(model, self.causal_lm_class)
            inputs_dict["num_items_in_batch"] = torch.tensor(inputs_dict["input_ids"].shape[0])
            inputs_dict["labels"] = inputs_dict["input_ids"]
            model(**inputs_dict, return_dict=False)


# Two tests pass for Llama and skip themselves for AttnRes, the model not using transformers' output-capturing
# machinery (`@capture_outputs`, `_can_record_outputs`: AttnRes collects hidden states and attentions itself, as its
# layers carry several depth sources): test_capture_outputs_decorator and
# test_can_capture_specific_layers_hidden_states. Nothing else is skipped for AttnRes.
ATTNRES_SKIPPED: dict[str, str] = {}


class LlamaReferenceTest(CausalLMCommonTest, unittest.TestCase):
    """The reference: Llama under exactly this harness."""

    config_class, base_model_class, causal_lm_class = LlamaConfig, LlamaModel, LlamaForCausalLM
    all_model_classes = (base_model_class, causal_lm_class)


class AttnResBlockTest(CausalLMCommonTest, unittest.TestCase):
    """Block AttnRes: 2 layers = 4 sublayers in blocks of 2 (one block per layer, 2 besides the embedding)."""

    config_class, base_model_class, causal_lm_class = AttnResConfig, AttnResModel, AttnResForCausalLM
    all_model_classes = (base_model_class, causal_lm_class)
    config_overrides = {"attn_res_mode": "block", "attn_res_block_size": 2}
    skipped = ATTNRES_SKIPPED


class AttnResFullTest(CausalLMCommonTest, unittest.TestCase):
    """Full AttnRes: every sublayer output is a source of its own (5 sources at the end, the embedding's too)."""

    config_class, base_model_class, causal_lm_class = AttnResConfig, AttnResModel, AttnResForCausalLM
    all_model_classes = (base_model_class, causal_lm_class)
    config_overrides = {"attn_res_mode": "full"}
    skipped = ATTNRES_SKIPPED
