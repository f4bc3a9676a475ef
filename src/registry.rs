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
