//! Tokenizer (`tokenizer.json` via the `tokenizers` crate) and the
//! checkpoint's own Jinja chat template (rendered with minijinja, configured
//! like transformers: trim_blocks, lstrip_blocks, Python string methods).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::Tensor;
use tokenizers::Tokenizer;

pub const IMAGE_PAD: &str = "<|image_pad|>";

/// The chat template of Qwen2.5-VL-Instruct (its `chat_template.json`),
/// written into checkpoints that `init_model` creates.
pub const QWEN25_VL_CHAT_TEMPLATE: &str = r#"{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}<|im_end|>
{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// One chat message; `content` is a string or a list of
/// `{"type": "image"}` / `{"type": "text", "text": ...}` parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Value,
}

impl Message {
    /// A user turn with `images` image placeholders followed by `text`.
    /// Without images the content is a plain string: text-only chat
    /// templates (Qwen2.5-Instruct) concatenate `message.content` as a
    /// string, and the Qwen2.5-VL template renders both forms the same.
    pub fn user_with_images(images: usize, text: &str) -> Self {
        if images == 0 {
            return Self::text("user", text);
        }
        let mut parts: Vec<Value> = (0..images).map(|_| serde_json::json!({"type": "image"})).collect();
        parts.push(serde_json::json!({"type": "text", "text": text}));
        Self { role: "user".into(), content: Value::Array(parts) }
    }
    pub fn text(role: &str, text: &str) -> Self {
        Self { role: role.into(), content: Value::String(text.into()) }
    }
}

/// Left-padded token ids of a batch of prompts.
pub struct EncodedBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub lengths: Vec<usize>,
}

pub struct ChatTokenizer {
    pub tokenizer: Tokenizer,
    pub template: String,
    pub pad_id: u32,
    pub eos_ids: Vec<u32>,
}

fn file_err(path: &Path, m: impl std::fmt::Display) -> ChatError {
    ChatError::File { path: path.into(), message: m.to_string() }
}

fn read_json(path: &Path) -> Result<Value, ChatError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| file_err(path, format!("not valid JSON: {e}")))
}

/// The chat template of a checkpoint: `chat_template.jinja`, then
/// `chat_template.json`, then `tokenizer_config.json` (string or named list).
pub fn find_template(dir: &Path) -> Result<String, ChatError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja).map_err(|e| file_err(&jinja, e));
    }
    let json = dir.join("chat_template.json");
    if json.exists() {
        return read_json(&json)?
            .get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| file_err(&json, "field `chat_template`: missing (expected a string)"));
    }
    let cfg = dir.join("tokenizer_config.json");
    match read_json(&cfg)?.get("chat_template") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(str::to_string)
            .ok_or_else(|| file_err(&cfg, "field `chat_template`: no template named \"default\"")),
        _ => Err(file_err(&cfg, "field `chat_template`: missing (and no chat_template.json / .jinja)")),
    }
}

impl ChatTokenizer {
    /// Load from a checkpoint directory. `eos_ids` come from the model config.
    pub fn load(dir: &Path, eos_ids: &[i64]) -> Result<Self, ChatError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| file_err(&path, e))?;
        let template = find_template(dir)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() { read_json(&cfg_path)? } else { Value::Null };
        let token_id = |key: &str| -> Option<u32> {
            let tok = match cfg.get(key)? {
                Value::String(s) => s.clone(),
                Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                _ => return None,
            };
            tokenizer.token_to_id(&tok)
        };
        let mut eos: Vec<u32> = eos_ids.iter().map(|&e| e as u32).collect();
        if let Some(e) = token_id("eos_token")
            && !eos.contains(&e)
        {
            eos.push(e);
        }
        let pad_id = token_id("pad_token")
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
            .or_else(|| eos.first().copied())
            .ok_or_else(|| file_err(&cfg_path, "no pad_token, <|endoftext|> or eos token to pad with"))?;
        Ok(Self { tokenizer, template, pad_id, eos_ids: eos })
    }

    /// Render the chat template like `apply_chat_template(tokenize=False)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.template).map_err(|e| ChatError::Template(e.to_string()))?;
        let tmpl = env.get_template("chat").map_err(|e| ChatError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            add_vision_id => false,
        })
        .map_err(|e| ChatError::Template(e.to_string()))
    }

    /// Expand the i-th `<|image_pad|>` into `counts[i]` copies (what the HF
    /// processor does before tokenising).
    pub fn expand_image_pads(text: &str, counts: &[usize]) -> Result<String, ChatError> {
        let pieces: Vec<&str> = text.split(IMAGE_PAD).collect();
        if pieces.len() - 1 != counts.len() {
            return Err(ChatError::Template(format!(
                "prompt has {} image placeholders but {} images were given",
                pieces.len() - 1,
                counts.len()
            )));
        }
        let mut out = String::with_capacity(text.len() + counts.iter().sum::<usize>() * IMAGE_PAD.len());
        for (i, p) in pieces.iter().enumerate() {
            out.push_str(p);
            if let Some(&n) = counts.get(i) {
                out.push_str(&IMAGE_PAD.repeat(n));
            }
        }
        Ok(out)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ChatError> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| ChatError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ChatError> {
        self.tokenizer.decode(ids, skip_special).map_err(|e| ChatError::Tokenizer(e.to_string()))
    }

    /// Tokenise prompts and left-pad them into one batch.
    pub fn encode_batch(&self, texts: &[String]) -> Result<EncodedBatch, ChatError> {
        let rows: Vec<Vec<u32>> = texts.iter().map(|t| self.encode(t)).collect::<Result<_, _>>()?;
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut mask = Vec::with_capacity(rows.len() * len);
        for r in &rows {
            let pad = len - r.len();
            ids.extend(std::iter::repeat_n(self.pad_id as i64, pad).chain(r.iter().map(|&t| t as i64)));
            mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1i64, r.len())));
        }
        let shape = [rows.len() as i64, len as i64];
        Ok(EncodedBatch {
            input_ids: Tensor::from_slice(&ids).view(shape),
            attention_mask: Tensor::from_slice(&mask).view(shape),
            lengths: rows.iter().map(Vec::len).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_pads_in_order_and_counts_placeholders() {
        let t = format!("a{IMAGE_PAD}b{IMAGE_PAD}c");
        let out = ChatTokenizer::expand_image_pads(&t, &[2, 1]).unwrap();
        assert_eq!(out, format!("a{IMAGE_PAD}{IMAGE_PAD}b{IMAGE_PAD}c"));
        let e = ChatTokenizer::expand_image_pads(&t, &[2]).unwrap_err().to_string();
        assert!(e.contains("2 image placeholders but 1 images"), "{e}");
    }

    #[test]
    fn text_only_user_turns_render_the_same_under_the_vl_template() {
        let tok = ChatTokenizer {
            tokenizer: Tokenizer::new(tokenizers::models::bpe::BPE::default()),
            template: QWEN25_VL_CHAT_TEMPLATE.into(),
            pad_id: 0,
            eos_ids: vec![],
        };
        let as_parts =
            Message { role: "user".into(), content: serde_json::json!([{"type": "text", "text": "Which lesion?"}]) };
        let plain = Message::user_with_images(0, "Which lesion?");
        assert_eq!(plain.content, Value::String("Which lesion?".into()));
        assert_eq!(tok.render(&[plain], true).unwrap(), tok.render(&[as_parts], true).unwrap());
    }

    #[test]
    fn template_lookup_prefers_chat_template_json_and_names_missing_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "default", "template": "T"}]}"#,
        )
        .unwrap();
        assert_eq!(find_template(dir.path()).unwrap(), "T");
        std::fs::write(dir.path().join("chat_template.json"), r#"{"chat_template": "J"}"#).unwrap();
        assert_eq!(find_template(dir.path()).unwrap(), "J");
        std::fs::write(dir.path().join("chat_template.json"), r#"{"other": 1}"#).unwrap();
        let e = find_template(dir.path()).unwrap_err().to_string();
        assert!(e.contains("chat_template.json") && e.contains("`chat_template`"), "{e}");
    }
}
