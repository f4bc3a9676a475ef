//! The one loader of an HF checkpoint directory, for every stage that runs a
//! model (eval, the judge's local backend, SFT, GRPO) and the `pipeline
//! model` commands: `config.json`, the tokenizer and chat template, the image
//! processor settings, and the safetensors weights (mmapped).
//!
//! The small files are read first, so a checkpoint without a tokenizer fails
//! in milliseconds rather than after the weights of a 7B model are read.
//! Every error names the file it is about.

use std::path::Path;

use tch::{Device, Kind};

use crate::chat::{ChatError, ChatTokenizer};
use crate::config::{CONFIG_FILE, Qwen25VlConfig};
use crate::error::ModelError;
use crate::model::Qwen25Vl;
use crate::processor::{ImageProcessor, ProcessorError};

#[derive(Debug, thiserror::Error)]
pub enum PretrainedError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] ChatError),
    #[error(transparent)]
    Processor(#[from] ProcessorError),
}

/// A loaded checkpoint: model, tokenizer (with its chat template) and image
/// processor.
pub struct Pretrained {
    pub model: Qwen25Vl,
    pub tokenizer: ChatTokenizer,
    pub processor: ImageProcessor,
}

impl Pretrained {
    /// Load `dir` with floating weights as `kind` on `device` (see
    /// [`crate::device`] for how stages choose them).
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self, PretrainedError> {
        let config = Qwen25VlConfig::from_file(&dir.join(CONFIG_FILE)).map_err(ModelError::from)?;
        let tokenizer = ChatTokenizer::load(dir, &config.eos_token_id)?;
        let processor = ImageProcessor::from_checkpoint(dir)?;
        tracing::info!("loading {} ({}) as {kind:?} on {device:?}", dir.display(), config.model_type.name());
        let model = Qwen25Vl::load_weights(config, dir, kind, device)?;
        Ok(Self { model, tokenizer, processor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init_model::{InitModelParams, write_checkpoint};

    fn tiny(dir: &Path, text_only: bool) {
        let p = InitModelParams { vocab_size: 300, ..Default::default() };
        let corpus = vec!["What abnormality is visible? <answer>A</answer>".to_string()];
        write_checkpoint(&p, &corpus, 3, text_only, dir).unwrap();
    }

    fn err(dir: &Path) -> String {
        match Pretrained::load(dir, Kind::Float, Device::Cpu) {
            Ok(_) => panic!("{} loaded", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn loads_model_tokenizer_and_processor_of_vl_and_text_checkpoints() {
        for text_only in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            tiny(dir.path(), text_only);
            let p = Pretrained::load(dir.path(), Kind::Float, Device::Cpu).unwrap();
            assert_eq!(p.model.visual.is_none(), text_only);
            assert_eq!(p.model.kind, Kind::Float);
            assert!(!p.tokenizer.eos_ids.is_empty() && !p.tokenizer.template.is_empty());
            // init_model writes min/max pixels different from the release defaults.
            let written = !text_only;
            assert_eq!(p.processor != ImageProcessor::default(), written, "text_only = {text_only}");
        }
    }

    #[test]
    fn errors_name_the_missing_or_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        tiny(dir.path(), false);
        let d = dir.path();

        std::fs::remove_file(d.join("tokenizer.json")).unwrap();
        let e = err(d);
        assert!(e.contains(&d.join("tokenizer.json").display().to_string()), "{e}");

        tiny(d, false); // restores tokenizer.json
        std::fs::write(d.join("preprocessor_config.json"), r#"{"resample": 0}"#).unwrap();
        let e = err(d);
        assert!(e.contains("preprocessor_config.json") && e.contains("`resample`"), "{e}");

        tiny(d, false);
        let config = d.join(CONFIG_FILE);
        let mut raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        raw["model_type"] = "llava".into();
        std::fs::write(&config, raw.to_string()).unwrap();
        let e = err(d);
        assert!(e.contains("config.json") && e.contains("model_type"), "{e}");
        assert!(e.contains("\"llava\"") && e.contains("\"qwen2_5_vl\", \"qwen2\""), "names the supported types: {e}");

        std::fs::remove_file(&config).unwrap();
        let e = err(d);
        assert!(e.contains(&config.display().to_string()), "{e}");

        tiny(d, false);
        for f in std::fs::read_dir(d).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|x| x == "safetensors") {
                std::fs::remove_file(f).unwrap();
            }
        }
        let e = err(d);
        assert!(e.contains(&d.display().to_string()) && e.contains("safetensors"), "{e}");
    }
}
