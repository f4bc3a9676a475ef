//! The one "dataset row -> chat prompt" encoding of the training stages:
//! the user turn (image + question rebuilt for the prompt variant) rendered
//! with the checkpoint's chat template and the generation prompt, image pads
//! expanded to the image's visual tokens, tokenized. SFT appends its target
//! to these tokens; GRPO generates after them.

use anyhow::Context as _;
use stages_task::dataset::VqaRow;
use stages_task::prompt::{NO_THINK_TEMPLATE, PromptVariant, THINK_TEMPLATE, user_text};
use stages_vlm::chat::{ChatTokenizer, Message};
use stages_vlm::processor::ImageProcessor;
use tch::Tensor;

/// A tokenized prompt with its image inputs.
pub struct EncodedPrompt {
    /// The user text (for logs and sample files).
    pub user: String,
    pub ids: Vec<i64>,
    /// (patches, 1176) processor output, or None for a text-only row.
    pub pixel_values: Option<Tensor>,
    /// (t, h, w) patch grid of the image, if any.
    pub grid: Vec<[i64; 3]>,
}

/// Builds prompts the way generation and the eval stage see them.
pub struct PromptEncoder<'a> {
    pub tokenizer: &'a ChatTokenizer,
    pub processor: &'a ImageProcessor,
    pub variant: PromptVariant,
}

impl PromptEncoder<'_> {
    pub fn encode(&self, row: &VqaRow) -> anyhow::Result<EncodedPrompt> {
        let user = user_text(&row.problem, self.variant, THINK_TEMPLATE, NO_THINK_TEMPLATE)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("item `{}`", row.id))?;
        let n_images = usize::from(row.image.is_some());
        let mut prompt = self.tokenizer.render(&[Message::user_with_images(n_images, &user)], true)?;
        let (pixel_values, grid) = match &row.image {
            Some(bytes) => {
                let img = image::load_from_memory(bytes)
                    .with_context(|| format!("item `{}`: column `image.bytes` is not a decodable image", row.id))?;
                let vis = self.processor.process(&[img])?;
                let counts = vis.tokens_per_image(self.processor.merge_size);
                prompt = ChatTokenizer::expand_image_pads(&prompt, &counts)?;
                (Some(vis.pixel_values), vis.grid_thw)
            }
            None => (None, Vec::new()),
        };
        let ids = self.tokenizer.encode(&prompt)?.into_iter().map(i64::from).collect();
        Ok(EncodedPrompt { user, ids, pixel_values, grid })
    }
}
