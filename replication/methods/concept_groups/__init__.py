"""Concept Group Learning (CGL; Varshneya et al., IJCAI 2021), paper 03, notebook 03, profile section `[cgl]`.

The filters of each regularised conv layer are split, before training, into G contiguous groups; the
group activation loss L_g pulls the soft receptive fields psi of a group together, the spatial loss
L_s makes every soft map compact, and the block norm R_bn (l2,1 over filter groups) replaces weight
decay. Tags in the docstrings refer to `03_concept_group_learning.md`: [P] paper, [C] official code
`srb-cv/cgl`, [I] this project's choice, [U] unknown.

Modules, lowest first (each imports only those before it):
- `groups`: the filter partition and the group weight norms;
- `layers`: which layers are regularised and dissected, per architecture;
- `eager_kernels`, `soft_map_kernels`: the autograd functions behind psi, L_g and L_s (eager PyTorch,
  any device; fused numba, CPU);
- `receptive_field`: psi (`SoftReceptiveField`), soft-IoU distance, spatial spread;
- `losses`: the loss terms and `cgl_loss_terms(model, CGLConfig)`;
- `metrics`: relevance, RUD, within-group distance, group statistics, purity;
- `experiment`: `CGLSettings` (the `[cgl]` section), the tasks' images (`synthetic_task`, `main_task`
  -> `TaskData`), `VariantRecipe`, `train_variant` and the run functions `run_sweep`, `run_synthetic`,
  `run_main`, `run_group_statistics`;
- `claims`: `claim_results(...) -> list[ClaimResult]` (G1-G8);
- `figures`: `plot_group_maps`, `plot_top_activations` (Fig. 5), `plot_relevance`.

The experiment convention (as for every paper): a settings dataclass built from the profile section,
run functions returning tables, `claim_results` and figure functions; all re-exported here.
"""
from replication.methods.concept_groups.claims import claim_results
from replication.methods.concept_groups.experiment import (
    LAMBDA_BN_RULES,
    PAPER_SCHEDULE,
    PAPER_TRAIN_IMAGES,
    SYNTHETIC_CATEGORIES,
    VARIANT_LABELS,
    VARIANTS,
    CGLSettings,
    TaskData,
    TrainedModel,
    VariantRecipe,
    build_model,
    integrated_lr,
    main_task,
    relevance_distributions,
    run_group_statistics,
    run_main,
    run_sweep,
    run_synthetic,
    select_lambda,
    shrinkage_budget,
    synthetic_task,
    train_variant,
    training_record,
)
from replication.methods.concept_groups.figures import plot_group_maps, plot_relevance, plot_top_activations
from replication.methods.concept_groups.groups import GROUPS, GroupPartition, group_weight_norms, partition_filters
from replication.methods.concept_groups.layers import (
    ACTIVATION_CONVS,
    DISSECTED_CONVS,
    activation_layers,
    dissected_layers,
    grouped_layers,
)
from replication.methods.concept_groups.losses import (
    LAYER_REDUCTIONS,
    LG_REDUCTIONS,
    PAIR_SAMPLINGS,
    PAIRS_PER_FILTER,
    RECEPTIVE_FIELD_MODULE,
    BlockNorm,
    CGLConfig,
    GroupActivationLoss,
    SpatialLoss,
    cgl_loss_terms,
)
from replication.methods.concept_groups.metrics import (
    dissection_tables,
    group_purity,
    group_statistics,
    mask_overlap,
    purity_pairs,
    ratio_of_unique_detectors,
    relevance_summary,
    relevance_table,
    weight_correlation,
    within_group_distance,
)
from replication.methods.concept_groups.receptive_field import (
    KERNELS,
    SPATIAL_EPS,
    STD_EPS,
    MapStatistics,
    SoftReceptiveField,
    soft_iou_distance,
    spatial_spread,
)

__all__ = [
    "ACTIVATION_CONVS", "DISSECTED_CONVS", "GROUPS", "KERNELS", "LAMBDA_BN_RULES", "LAYER_REDUCTIONS", "LG_REDUCTIONS",
    "PAIRS_PER_FILTER", "PAIR_SAMPLINGS", "PAPER_SCHEDULE", "PAPER_TRAIN_IMAGES", "RECEPTIVE_FIELD_MODULE", "SPATIAL_EPS",
    "STD_EPS", "SYNTHETIC_CATEGORIES", "VARIANTS", "VARIANT_LABELS", "BlockNorm", "CGLConfig", "CGLSettings",
    "GroupActivationLoss", "GroupPartition", "MapStatistics", "SoftReceptiveField", "SpatialLoss", "TaskData",
    "TrainedModel", "VariantRecipe", "activation_layers", "build_model", "cgl_loss_terms", "claim_results",
    "dissected_layers", "dissection_tables", "group_purity", "group_statistics", "group_weight_norms", "grouped_layers",
    "integrated_lr", "main_task", "mask_overlap", "partition_filters", "plot_group_maps", "plot_relevance", "plot_top_activations",
    "purity_pairs", "ratio_of_unique_detectors", "relevance_distributions", "relevance_summary", "relevance_table",
    "run_group_statistics", "run_main", "run_sweep", "run_synthetic", "select_lambda", "shrinkage_budget",
    "soft_iou_distance", "spatial_spread", "synthetic_task", "train_variant", "training_record", "weight_correlation",
    "within_group_distance",
]
