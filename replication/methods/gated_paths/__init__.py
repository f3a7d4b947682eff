"""Neural Architecture Disentanglement (NAD, paper 05, notebook 05): per-class channel gates ("paths").

A gate multiplies one layer's output channel-wise. For each class c, NAD learns gate logits m^c
(one vector per gate location) on a frozen network so that the gated network still classifies c and
keeps its activations, while as few channels as possible stay open; the class path is the set of
channels with sigmoid(m) > 0.5. Everything here follows the official code `hujiecpp/NAD` as
described in `shared/papers/05_architecture_disentanglement.md` (sections 3, 4 and 6); each official
quirk is the default and has a switch.

Modules, in pipeline order (this file only re-exports their public names):
- `gates`: gate placement (`gate_locations`) and in-line gating (`gated`, `gate_values`);
- `search`: `PathSearchConfig`, `search_paths` (batched) and `find_paths_sequential` (the official
  loop), both returning a `PathSet`; `extend_search` (a search continued to a higher epoch cap) and
  `stopped_by_rule`;
- `images`: class image tensors (`images_by_class`) and 2x2 mosaics;
- `similarity`: path IoU, similarity, diversity, misclassification ranks, concepts on paths;
- `metrics`: path accuracy and the mosaic hit rate (per layer, dips, curve distance);
- `experiment`: the notebook's convention: `NADSettings` (profile [nad]), the run steps
  `load_class_images` (-> `ClassImages`), `prepare_network` / `prepare_networks` (-> `Network`),
  `search_paths_cached` / `search_networks`, `analyse_architecture` / `analyse_networks`
  (-> `ArchitectureResult`), `class_groups`, `dissect_locations`, `concepts_on_paths`, `save_paths`,
  and the notebook's tables `placement_table`, `training_table`, `path_accuracy_table`,
  `hit_rate_table`, `similarity_by_group`, `misclassification_table`, `diversity_table`;
- `claims`: the tests of N1-N7 through the claims kit (`claim_tests`), `claim_results` (the claims table) and
  `n6_distances` (N6's null per arch);
- `figures`: `plot_hit_rates`, `plot_units_kept`, `plot_similarity`.
"""
from replication.methods.gated_paths.claims import CONNECTION_TYPES, claim_results, claim_tests, n6_distances
from replication.methods.gated_paths.experiment import (ArchitectureResult, ClassGroups, ClassImages, NADSettings,
                                                        Network, Searches, analyse_architecture, analyse_networks,
                                                        calibrate_betas, class_groups, concepts_on_paths, convergence_table,
                                                        dissect_locations, diversity_table, hit_rate_table,
                                                        load_class_images, misclassification_table, network_name,
                                                        path_accuracy_table, placement_table, prepare_network,
                                                        prepare_networks, save_paths, search_networks,
                                                        search_paths_cached, similarity_by_group, stability_table,
                                                        training_recipes, training_table)
from replication.methods.gated_paths.figures import plot_hit_rates, plot_search_traces, plot_similarity, plot_units_kept
from replication.methods.gated_paths.gates import (GATE_FUNCTIONS, GateHooks, GateLocation, gate_locations,
                                                   gate_values, gated, ones_gates)
from replication.methods.gated_paths.images import (Mosaic, image_and_label, images_by_class, mosaic_tensor,
                                                    sample_mosaics)
from replication.methods.gated_paths.metrics import (class_hit_rates, curve_distance, deep_hit_rates, hit_rates,
                                                     largest_dip, path_accuracy,
                                                     quadrant_share, summarize_hit_rates, top_fraction_mask)
from replication.methods.gated_paths.search import (BETA_ARCH_OF_FAMILY, OFFICIAL_BETA, ORIGINAL_CACHE_BYTES,
                                                    SEEDINGS, TRACE_COLUMNS, PathSearchConfig, PathSet, class_path_loss,
                                                    extend_search, find_paths_sequential, official_beta, search_copy,
                                                    search_paths, stopped_by_rule)
from replication.methods.gated_paths.similarity import (group_similarity, misclassification_ranks, path_concepts,
                                                        path_diversity, path_diversity_se, path_iou,
                                                        path_similarity, path_stability, random_path_diversity,
                                                        random_paths_like)

__all__ = [
    "CONNECTION_TYPES", "claim_results", "claim_tests", "n6_distances",
    "ArchitectureResult", "ClassGroups", "ClassImages", "NADSettings", "Network", "Searches", "analyse_architecture",
    "analyse_networks", "calibrate_betas", "class_groups", "concepts_on_paths", "convergence_table", "dissect_locations",
    "diversity_table", "hit_rate_table", "load_class_images", "misclassification_table", "network_name",
    "path_accuracy_table", "placement_table", "prepare_network", "prepare_networks", "save_paths", "search_networks",
    "search_paths_cached", "similarity_by_group", "stability_table", "training_recipes", "training_table",
    "plot_hit_rates", "plot_search_traces", "plot_similarity", "plot_units_kept",
    "GATE_FUNCTIONS", "GateHooks", "GateLocation", "gate_locations", "gate_values", "gated", "ones_gates",
    "Mosaic", "image_and_label", "images_by_class", "mosaic_tensor", "sample_mosaics",
    "class_hit_rates", "curve_distance", "deep_hit_rates", "hit_rates", "largest_dip", "path_accuracy", "quadrant_share", "summarize_hit_rates",
    "top_fraction_mask",
    "BETA_ARCH_OF_FAMILY", "OFFICIAL_BETA", "ORIGINAL_CACHE_BYTES", "SEEDINGS", "TRACE_COLUMNS", "PathSearchConfig", "PathSet",
    "class_path_loss", "extend_search", "find_paths_sequential", "official_beta", "search_copy", "search_paths",
    "stopped_by_rule",
    "group_similarity", "misclassification_ranks", "path_concepts", "path_diversity", "path_diversity_se",
    "path_iou", "path_similarity", "path_stability", "random_path_diversity", "random_paths_like",
]
