//! One plain-text table per scenario (Markdown, so it can be pasted into the docs), and the
//! same rows as JSON on request.

use serde_json::{Map, Value};

pub struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Table {
        Table {
            title: title.into(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn print(&self, json: bool) {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .chain(std::iter::once(&self.headers[i]))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect();
            format!("| {} |", padded.join(" | "))
        };
        println!("\n### {}\n", self.title);
        println!("{}", line(&self.headers));
        let rule: Vec<String> = widths
            .iter()
            .map(|w| format!("{}:", "-".repeat(w.saturating_sub(1).max(1))))
            .collect();
        println!(
            "|{}|",
            rule.iter()
                .map(|r| format!(" {r} "))
                .collect::<Vec<_>>()
                .join("|")
        );
        for row in &self.rows {
            println!("{}", line(row));
        }
        if !self.notes.is_empty() {
            println!();
            for note in &self.notes {
                println!("- {note}");
            }
        }
        if json {
            let rows: Vec<Value> = self
                .rows
                .iter()
                .map(|r| {
                    let mut m = Map::new();
                    for (h, c) in self.headers.iter().zip(r) {
                        m.insert(h.clone(), Value::String(c.clone()));
                    }
                    Value::Object(m)
                })
                .collect();
            let doc = serde_json::json!({ "title": self.title, "rows": rows, "notes": self.notes });
            println!("\njson {doc}");
        }
    }
}

/// A latency in µs, shown in ms.
pub fn ms(us: u64) -> String {
    if us == 0 {
        "-".into()
    } else if us < 10_000 {
        format!("{:.2}", us as f64 / 1000.0)
    } else {
        format!("{:.0}", us as f64 / 1000.0)
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

pub fn rate(n: f64) -> String {
    if n >= 100.0 {
        format!("{:.0}", n)
    } else {
        format!("{:.1}", n)
    }
}
