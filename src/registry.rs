//! Every stage kind the `pipeline` binary knows: one line per kind.
//! (The engine never names a kind; this list is the only place that does.)

use stage_api::Registry;

pub fn registry() -> Registry {
    Registry::new()
        // basic (engine exercise): files, concat, checksum, text
        .register::<stages_basic::Files>()
        .register::<stages_basic::Concat>()
        .register::<stages_basic::Checksum>()
        .register::<stages_basic::Text>()
        // data: phantom, rexgct_index, lesion_slices, render, vqa, split, parquet_export,
        // hf_vqa (ChartQA/TextVQA Parquet), hf_disk_vqa (save_to_disk, the released CT-RATE-VQA)
        .register::<stages_data::Phantom>()
        .register::<stages_data::RexgctIndex>()
        .register::<stages_data::LesionSlices>()
        .register::<stages_data::Render>()
        .register::<stages_data::Vqa>()
        .register::<stages_data::Split>()
        .register::<stages_data::ParquetExport>()
        .register::<stages_data::HfVqa>()
        .register::<stages_data::HfDiskVqa>()
        // model: init_model
        .register::<stages_vlm::InitModel>()
        // train: sft, grpo
        .register::<stages_train::Sft>()
        .register::<stages_train::Grpo>()
        // eval: eval, judge, report, general_vqa
        .register::<stages_eval::Eval>()
        .register::<stages_eval::Judge>()
        .register::<stages_eval::ReportStage>()
        .register::<stages_eval::GeneralVqa>()
}

#[cfg(test)]
mod tests {
    use super::registry;

    /// Integer params that are not counts or sizes, so need no range of their own.
    const NOT_COUNTS: &[(&str, &str, &str)] = &[
        ("eval", "seed", "any u64 is a seed"),
        ("eval", "ci.seed", "any u64 is a seed"),
        ("judge", "ci.seed", "any u64 is a seed"),
        ("lesion_slices", "connectivity", "4 or 8, checked by its type"),
        ("render", "box_color[]", "an RGB channel: u8 is its range"),
        ("render", "patch_border_color[]", "an RGB channel: u8 is its range"),
    ];

    /// Issue 17: every count and size of every kind has a range that `plan`
    /// checks and docs/recipes.md shows, and every default is inside it.
    #[test]
    fn every_count_and_size_param_declares_a_range_its_default_is_in() {
        let mut unranged = Vec::new();
        for kind in registry().iter() {
            let doc = kind.doc();
            if let Err(e) = stage_api::ranges::check_defaults(&doc.params_schema) {
                panic!("{}: default of `{}` is outside its range: {}", doc.kind, e.path.join("."), e.message);
            }
            for path in stage_api::ranges::unranged_integers(&doc.params_schema) {
                if !NOT_COUNTS.iter().any(|(k, p, _)| *k == doc.kind && *p == path) {
                    unranged.push(format!("{}.{path}", doc.kind));
                }
            }
        }
        assert!(unranged.is_empty(), "integer params without a declared range: {unranged:?}");
    }
}
