//! Charts of benchmark results, as SVG (the `plotters` crate, SVG backend: no fonts or
//! native libraries needed). One panel per measured cell (a workload, a frame size and
//! direction ...), each with its own y axis; in each panel one bar per backend at its
//! median across rounds, with a whisker from its lowest to its highest round. Used by
//! `blk-bench --plot FILE.svg` and `net-bench --plot FILE.svg`.

use std::path::Path;

use plotters::prelude::*;

/// Errors drawing a chart.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Nothing to draw.
    #[error("no measurements to plot")]
    Empty,
    /// The drawing backend failed (e.g. the file could not be written).
    #[error("drawing {path}: {message}")]
    Draw {
        /// The chart file.
        path: String,
        /// What plotters reported.
        message: String,
    },
}

/// One panel: a cell measured on several backends.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Panel title, e.g. "randread QD32".
    pub label: String,
    /// Backend name and its value in each round.
    pub bars: Vec<(String, Vec<f64>)>,
}

/// Median, minimum and maximum of `v` (`None` when empty).
pub fn spread(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some((median, s[0], s[n - 1]))
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn draw_err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.display().to_string(),
        message: format!("{e:?}"),
    }
}

/// Draws `cells` into the SVG file `path` under `title`; `unit` labels the y axes.
pub fn bars(path: &Path, title: &str, unit: &str, cells: &[Cell]) -> Result<(), PlotError> {
    let cells: Vec<&Cell> = cells.iter().filter(|c| !c.bars.is_empty()).collect();
    if cells.is_empty() {
        return Err(PlotError::Empty);
    }
    let cols = cells.len().min(3);
    let rows = cells.len().div_ceil(cols);
    let size = (360 * cols as u32, 300 * rows as u32 + 40);
    let err = draw_err(path);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(&err)?;
    let panels = root.split_evenly((rows, cols));
    for (cell, area) in cells.iter().zip(panels.iter()) {
        let stats: Vec<(&str, (f64, f64, f64))> = cell
            .bars
            .iter()
            .filter_map(|(name, v)| spread(v).map(|s| (name.as_str(), s)))
            .collect();
        let top = stats
            .iter()
            .map(|(_, (_, _, max))| *max)
            .fold(0.0f64, f64::max)
            .max(f64::MIN_POSITIVE)
            * 1.15;
        let n = stats.len().max(1) as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(&cell.label, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..n, 0.0..top)
            .map_err(&err)?;
        let names: Vec<String> = stats.iter().map(|(name, _)| name.to_string()).collect();
        let label = move |x: &f64| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * stats.len() + 1)
            .x_label_formatter(&label)
            .y_desc(unit)
            .y_label_formatter(&|y: &f64| short(*y))
            .draw()
            .map_err(&err)?;
        for (i, (_, (median, min, max))) in stats.iter().enumerate() {
            let x = i as f64;
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series([Rectangle::new(
                    [(x + 0.15, 0.0), (x + 0.85, *median)],
                    color.mix(0.8).filled(),
                )])
                .map_err(&err)?;
            chart
                .draw_series([ErrorBar::new_vertical(
                    x + 0.5,
                    *min,
                    *median,
                    *max,
                    BLACK.stroke_width(1),
                    10,
                )])
                .map_err(&err)?;
        }
    }
    root.present().map_err(&err)?;
    Ok(())
}

/// 1234567 → "1.23M".
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heights of the filled bars (`<rect ... height="H" ... fill-opacity=...>` with a
    /// bar colour) in drawing order.
    fn bar_heights(svg: &str) -> Vec<f64> {
        svg.split("<rect")
            .skip(1)
            .filter(|r| {
                COLORS
                    .iter()
                    .any(|c| r.contains(&format!("fill=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2)))
            })
            .filter_map(|r| {
                let h = r.split("height=\"").nth(1)?.split('"').next()?;
                h.parse().ok()
            })
            .collect()
    }

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[f64::NAN, 5.0]), Some((5.0, 5.0, 5.0)));
    }

    #[test]
    fn bars_are_drawn_at_the_medians_with_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chart.svg");
        let cells = [
            Cell {
                label: "randread QD1".into(),
                bars: vec![
                    ("outboard".into(), vec![90.0, 100.0, 110.0]),
                    ("qsd".into(), vec![50.0, 45.0, 55.0]),
                ],
            },
            Cell {
                label: "randwrite QD32".into(),
                bars: vec![("outboard".into(), vec![400e3, 420e3, 380e3])],
            },
        ];
        bars(&path, "blk-bench", "IOPS", &cells).expect("draw");
        let svg = std::fs::read_to_string(&path).expect("svg");
        for text in [
            "blk-bench",
            "randread QD1",
            "randwrite QD32",
            "outboard",
            "qsd",
            "IOPS",
        ] {
            assert!(svg.contains(text), "{text} missing from the chart");
        }
        let h = bar_heights(&svg);
        assert_eq!(h.len(), 3, "one bar per backend and cell: {h:?}");
        // Same panel, same scale: bar heights follow the medians (100 vs 50).
        let ratio = h[0] / h[1];
        assert!((ratio - 2.0).abs() < 0.05, "bar ratio {ratio}, medians 2:1");
        assert!(matches!(bars(&path, "x", "y", &[]), Err(PlotError::Empty)));
    }
}
