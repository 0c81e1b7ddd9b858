"""Low-rank plus sparse decomposition of layers (:func:`decompose`), and the menu allocation over it.

>>> result = cetopt.decompose(model, calibration_inputs, rank=4, nnz=0.05, method="admm")
>>> result.model, result.ratio
"""

from cetopt.lowrank.decompose import METHODS, Decomposition, LayerResult, decompose, fit_layer
from cetopt.lowrank.fit import (
    GramFactors,
    LowRankSparse,
    fit_admm,
    fit_prune,
    fit_svd,
    fit_svd_ranks,
    fit_weight_space,
    project_sparse,
    truncate,
)
from cetopt.lowrank.joint import (
    SINGLE_KINDS,
    JointCandidate,
    JointResult,
    activation_options,
    apply_options,
    gptq_quant_options,
    joint_compress,
    option_bops,
    prefer_candidate,
    rescore_sequential,
    score_menu,
    split_calibration,
)
from cetopt.lowrank.layers import (
    LayerData,
    collect,
    collect_each,
    layer_errors,
    menu_layers,
    supported_layers,
)
from cetopt.lowrank.menu import (
    KINDS,
    Menu,
    MenuOption,
    MenuPlan,
    build_menu,
    option_matrix,
    sparse_bytes,
    stored_bytes,
    stored_params,
)
from cetopt.lowrank.suffix import output_errors

__all__ = [
    "KINDS",
    "METHODS",
    "SINGLE_KINDS",
    "Decomposition",
    "GramFactors",
    "JointCandidate",
    "JointResult",
    "LayerData",
    "LayerResult",
    "LowRankSparse",
    "Menu",
    "MenuOption",
    "MenuPlan",
    "activation_options",
    "apply_options",
    "build_menu",
    "collect",
    "collect_each",
    "decompose",
    "fit_admm",
    "fit_layer",
    "fit_prune",
    "fit_svd",
    "fit_svd_ranks",
    "fit_weight_space",
    "gptq_quant_options",
    "joint_compress",
    "layer_errors",
    "menu_layers",
    "option_bops",
    "option_matrix",
    "output_errors",
    "prefer_candidate",
    "project_sparse",
    "rescore_sequential",
    "score_menu",
    "sparse_bytes",
    "split_calibration",
    "stored_bytes",
    "stored_params",
    "supported_layers",
    "truncate",
]
