//! What a run measured: a human-readable table or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// One measured figure.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Figure {
    /// Machine-friendly name (`acked_frames_per_second`).
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit (`frames/s`, `ms`, `bytes`).
    pub unit: String,
}

/// A target from the design, checked against a figure of the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Goal {
    /// What is compared.
    pub name: String,
    /// The target as text (`>= 100000 frames/s`).
    pub target: String,
    /// Whether this run met it.
    pub met: bool,
}

/// The result of one scenario.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// The parameters it ran with.
    pub parameters: BTreeMap<String, serde_json::Value>,
    /// What it measured, in order.
    pub figures: Vec<Figure>,
    /// Targets and whether they were met.
    pub goals: Vec<Goal>,
    /// How the figures were obtained, where it matters for reading them.
    pub notes: Vec<String>,
}

impl Report {
    /// An empty report for `scenario`.
    pub fn new(scenario: &str) -> Report {
        Report { scenario: scenario.to_owned(), ..Report::default() }
    }

    /// Records a parameter.
    pub fn parameter(&mut self, name: &str, value: impl Into<serde_json::Value>) -> &mut Self {
        self.parameters.insert(name.to_owned(), value.into());
        self
    }

    /// Records a figure.
    pub fn figure(&mut self, name: &str, value: f64, unit: &str) -> &mut Self {
        self.figures.push(Figure { name: name.to_owned(), value, unit: unit.to_owned() });
        self
    }

    /// Records a goal: `value` compared with `target` (`at_least` or at most).
    pub fn goal(&mut self, name: &str, value: f64, target: f64, unit: &str, at_least: bool) -> &mut Self {
        let (met, relation) = if at_least { (value >= target, ">=") } else { (value < target, "<") };
        self.goals.push(Goal { name: name.to_owned(), target: format!("{relation} {target} {unit}"), met });
        self
    }

    /// Adds a note.
    pub fn note(&mut self, note: impl Into<String>) -> &mut Self {
        self.notes.push(note.into());
        self
    }

    /// The value of the figure `name`, if measured.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.figures.iter().find(|figure| figure.name == name).map(|figure| figure.value)
    }

    /// The report as an aligned text table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "== {} ==", self.scenario);
        if !self.parameters.is_empty() {
            let parameters: Vec<String> =
                self.parameters.iter().map(|(name, value)| format!("{name}={value}")).collect();
            let _ = writeln!(out, "parameters: {}", parameters.join(" "));
        }
        let width = self.figures.iter().map(|figure| figure.name.len()).max().unwrap_or(0);
        for figure in &self.figures {
            let _ = writeln!(
                out,
                "  {:width$}  {:>14}  {}",
                figure.name,
                format_value(figure.value),
                figure.unit
            );
        }
        for goal in &self.goals {
            let verdict = if goal.met { "met" } else { "MISSED" };
            let _ = writeln!(out, "  goal {}: {} — {verdict}", goal.name, goal.target);
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }
}

fn format_value(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else if value.abs() >= 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_prints_its_figures_and_goals_and_serialises() {
        let mut report = Report::new("throughput");
        report.parameter("rooms", 4).figure("acked_frames_per_second", 123_456.0, "frames/s");
        report.goal("throughput", 123_456.0, 100_000.0, "frames/s", true);
        report.goal("p99", 12.5, 10.0, "ms", false);
        let table = report.to_table();
        assert!(table.contains("acked_frames_per_second"), "{table}");
        assert!(table.contains("123456"), "{table}");
        assert!(table.contains(">= 100000 frames/s — met"), "{table}");
        assert!(table.contains("< 10 ms — MISSED"), "{table}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["figures"][0]["value"], 123_456.0);
        assert_eq!(json["parameters"]["rooms"], 4);
        assert_eq!(report.value("acked_frames_per_second"), Some(123_456.0));
    }
}
