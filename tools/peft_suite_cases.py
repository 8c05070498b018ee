"""VeFA and LoRFA rows for PEFT's own tests/test_custom_models.py, the way its
IA3 and LoRA rows are written (tools/peft-suite.sh adds them to a copy of the
file from the installed peft's source release and runs them).

Rows that cannot apply are left out and listed in docs/quantized.md (an nn.Embedding
has no input features; LoRFA refuses grouped convolutions; VeFA's shift is
refused on zero-padded convolutions). EmbConv1D's Conv1D has 5 input
features and MLP's lin0 10, hence the small ranks.
"""

from featadapt.integrations.peft import LoRFAConfig, VeFAConfig

TEST_CASES = [
    ("Vanilla MLP 1 VeFA", "MLP", VeFAConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 VeFA", "MLP", VeFAConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 VeFA", "MLP", VeFAConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 VeFA", "MLP", VeFAConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 VeFA", "MLP", VeFAConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 VeFA", "MLP", VeFAConfig, {"target_modules": ["lin0", "lin1"], "shift": True}),
    ("transformers Conv1D 1 VeFA", "EmbConv1D", VeFAConfig, {"target_modules": ["conv1d"]}),
    ("transformers Conv1D 2 VeFA", "EmbConv1D", VeFAConfig, {"target_modules": ["conv1d", "lin0"]}),
    ("transformers Conv1D 3 VeFA", "EmbConv1D", VeFAConfig, {"target_modules": ["conv1d"], "modules_to_save": ["lin0"]}),
    ("Conv1d VeFA", "Conv1d", VeFAConfig, {"target_modules": ["conv1d"]}),
    ("Conv2d 1 VeFA", "Conv2d", VeFAConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 VeFA", "Conv2d", VeFAConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 VeFA", "Conv2d", VeFAConfig, {"target_modules": ["conv2d", "lin0"], "shift": True}),
    ("Conv2d 1x1 VeFA", "Conv2d1x1", VeFAConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d Groups VeFA", "Conv2dGroups", VeFAConfig, {"target_modules": ["conv2d"]}),
    ("Conv3d 1 VeFA", "Conv3d", VeFAConfig, {"target_modules": ["conv3d"]}),
    ("Conv3d 2 VeFA", "Conv3d", VeFAConfig, {"target_modules": ["conv3d", "lin0"]}),
    ("Vanilla MLP 1 LoRFA", "MLP", LoRFAConfig, {"target_modules": "lin0", "r": 4}),
    ("Vanilla MLP 2 LoRFA", "MLP", LoRFAConfig, {"target_modules": ["lin0", "lin1"], "r": 4}),
    ("Vanilla MLP 3 LoRFA", "MLP", LoRFAConfig, {"target_modules": ["lin0"], "r": 4, "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 4 LoRFA", "MLP", LoRFAConfig,
     {"target_modules": ["lin0"], "r": 4, "lora_alpha": 4, "lora_dropout": 0.1}),
    ("transformers Conv1D 1 LoRFA", "EmbConv1D", LoRFAConfig, {"target_modules": ["conv1d"], "r": 2}),
    ("transformers Conv1D 2 LoRFA", "EmbConv1D", LoRFAConfig, {"target_modules": ["conv1d", "lin0"], "r": 2}),
    ("Conv1d LoRFA", "Conv1d", LoRFAConfig, {"target_modules": ["conv1d"], "r": 1}),
    ("Conv2d 1 LoRFA", "Conv2d", LoRFAConfig, {"target_modules": ["conv2d"], "r": 4}),
    ("Conv2d 2 LoRFA", "Conv2d", LoRFAConfig, {"target_modules": ["conv2d", "lin0"], "r": 4}),
    ("Conv2d 1x1 LoRFA", "Conv2d1x1", LoRFAConfig, {"target_modules": ["conv2d"], "r": 1}),
    ("Conv3d 1 LoRFA", "Conv3d", LoRFAConfig, {"target_modules": ["conv3d"], "r": 4}),
]

_SAME, _OTHER = {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False}
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("VeFA Same", "vefa", VeFAConfig, _SAME, _SAME),
    ("VeFA Different", "vefa", VeFAConfig, _SAME, _OTHER),
    ("VeFA shift Same", "vefa", VeFAConfig, {**_SAME, "shift": True}, {**_SAME, "shift": True}),
    ("LoRFA Same", "lorfa", LoRFAConfig, {**_SAME, "r": 4}, {**_SAME, "r": 4}),
    ("LoRFA Different", "lorfa", LoRFAConfig, {**_SAME, "r": 4}, {**_OTHER, "r": 4}),
]

MIXED_ADAPTER_TEST_CASES = [
    ("VeFA mixed adapter", VeFAConfig(target_modules=["lin0"], init_weights=False),
     VeFAConfig(target_modules=["lin0"], shift=True, init_weights=False)),
    ("LoRFA mixed adapter", LoRFAConfig(target_modules=["lin0"], r=4, init_weights=False),
     LoRFAConfig(target_modules=["lin0"], r=8, init_weights=False)),
]
