//! A picture of a task's predictions on a few test images, as plain data: what the task
//! makes of a batch (`mtkd_vision_tasks::task::Task::picture`) and the report draws
//! (`mtkd_report::plot::draw_picture`), so that neither the loop nor the report knows the task.

/// One box to draw: its class, `x1, y1, x2, y2` in pixels, and a score for a prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawBox {
    pub class: usize,
    pub bbox: [f32; 4],
    pub score: Option<f32>,
}

/// Per column (the truth first, then each model) and per image of the batch, what the task
/// predicts.
#[derive(Debug, Clone, PartialEq)]
pub enum Picture {
    /// The class of every pixel (`-1`: not labelled), drawn over the image (`overlays.png`).
    Masks(Vec<Vec<Vec<i64>>>),
    /// The boxes, outlined on the image (`boxes.png`).
    Boxes(Vec<Vec<Vec<DrawBox>>>),
}
