//! The figure table printed at the end of a benchmark run.

/// One row of the table: what was measured, our figure, the reference it is compared
/// with, the target and whether it is met (`None` for figures without a target).
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub ours: String,
    pub reference: String,
    pub target: String,
    pub met: Option<bool>,
}

impl Figure {
    pub fn new(name: impl Into<String>, ours: impl Into<String>) -> Figure {
        Figure {
            name: name.into(),
            ours: ours.into(),
            reference: String::new(),
            target: String::new(),
            met: None,
        }
    }

    pub fn reference(mut self, reference: impl Into<String>) -> Figure {
        self.reference = reference.into();
        self
    }

    pub fn target(mut self, target: impl Into<String>, met: bool) -> Figure {
        self.target = target.into();
        self.met = Some(met);
        self
    }
}

pub fn ms(value: f64) -> String {
    format!("{value:.2} ms")
}

pub fn rate(value: f64, unit: &str) -> String {
    format!("{} {unit}/s", group_thousands(value.round() as u64))
}

pub fn group_thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// Prints the figures as a Markdown table, so it can be pasted into BENCHMARKS.md.
pub fn print_table(figures: &[Figure]) {
    let header = ["figure", "odooops-agent", "reference", "target", "met"];
    let rows: Vec<[String; 5]> = figures
        .iter()
        .map(|figure| {
            let met = match figure.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            [
                figure.name.clone(),
                figure.ours.clone(),
                figure.reference.clone(),
                figure.target.clone(),
                met.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(&header.map(String::from));
    line(&widths.map(|width| "-".repeat(width)));
    for row in &rows {
        line(row);
    }
}
