//! The README's figures, drawn as SVG with plotters (no font files: the SVG viewer renders
//! the text). Used by the failover benchmark (distributions) and the waveform capture.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use plotters::prelude::*;

type Fallible = Result<(), Box<dyn std::error::Error>>;

/// Where figures go: $AW_FIGURES_DIR (`docs/figures` to update the README's), else
/// target/figures. Created if missing.
pub fn figures_dir() -> PathBuf {
    let dir = std::env::var_os("AW_FIGURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/figures"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// One distribution of a CDF figure.
pub struct Curve<'a> {
    pub label: String,
    /// Values in microseconds, any order.
    pub values: &'a [f64],
    pub colour: RGBColor,
    pub dashed: bool,
}

/// Cumulative distributions on a log time axis (µs), with a vertical line at `budget_us`
/// (what the lookahead covers: beyond it the output underruns).
pub fn cdf(path: &Path, title: &str, curves: &[Curve<'_>], budget_us: f64) -> Fallible {
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    // The legend goes under the chart: the curves fill every corner of it.
    let (top, bottom) = root.split_vertically(500);
    let all = curves.iter().flat_map(|c| c.values.iter().copied());
    let lo = all.clone().fold(f64::INFINITY, f64::min).max(1.0) * 0.8;
    let hi = all.fold(0.0, f64::max).max(budget_us) * 1.3;
    // 1-2-5 steps: a log axis labels only its decades otherwise.
    let keys: Vec<f64> =
        (0..8).flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e))).filter(|&k| (lo..=hi).contains(&k)).collect();
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(56)
        .build_cartesian_2d((lo..hi).log_scale().with_key_points(keys), 0.0..100.0)?;
    chart
        .configure_mesh()
        .x_desc("microseconds after the SIGKILL (log scale)")
        .y_desc("% of kills")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for c in curves {
        let mut v = c.values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let points: Vec<(f64, f64)> = v.iter().enumerate().map(|(i, &x)| (x, 100.0 * (i + 1) as f64 / n)).collect();
        let style = c.colour.stroke_width(2);
        if c.dashed {
            chart.draw_series(DashedLineSeries::new(points, 8, 5, style))?;
        } else {
            chart.draw_series(LineSeries::new(points, style))?;
        }
    }
    let grey = RGBColor(90, 90, 90);
    chart.draw_series(LineSeries::new([(budget_us, 0.0), (budget_us, 100.0)], grey.stroke_width(2)))?;
    // The legend: two columns of line samples and labels.
    let budget = format!("the lookahead, {:.1} ms: later is an underrun", budget_us / 1000.0);
    let entries = curves.iter().map(|c| (c.label.as_str(), c.colour, c.dashed)).chain([(budget.as_str(), grey, false)]);
    for (k, (label, colour, dashed)) in entries.enumerate() {
        let (x, y) = (80 + 420 * (k as i32 % 2), 20 + 26 * (k as i32 / 2));
        let sample: Vec<(i32, i32)> = if dashed { vec![(x, y), (x + 10, y)] } else { vec![(x, y), (x + 28, y)] };
        bottom.draw(&PathElement::new(sample, colour.stroke_width(2)))?;
        if dashed {
            bottom.draw(&PathElement::new([(x + 16, y), (x + 28, y)], colour.stroke_width(2)))?;
        }
        bottom.draw(&Text::new(label.to_owned(), (x + 36, y - 8), ("sans-serif", 15)))?;
    }
    root.present()?;
    Ok(())
}

/// A captured stretch of one channel, for [`waveforms`].
pub struct Capture {
    /// What happened, for the row's title.
    pub title: String,
    pub rate: u32,
    /// One channel, -1..1.
    pub samples: Vec<f32>,
    /// The sample shown as 0 ms, and what it is (the x axis' legend).
    pub origin: usize,
    pub origin_name: String,
    /// Sample range shown in the overview.
    pub overview: (usize, usize),
    /// Marked sample ranges (the kill: a red line at each end), with their label.
    pub marks: Vec<(usize, usize, String)>,
    /// Close-ups: centre sample, half-width in samples, title.
    pub zooms: Vec<(usize, usize, String)>,
}

/// One row per capture: the overview (min/max envelope per pixel column) and its close-ups.
pub fn waveforms(path: &Path, title: &str, rows: &[Capture]) -> Fallible {
    let root = SVGBackend::new(path, (1200, 300 * rows.len() as u32 + 40)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    for (area, cap) in root.split_evenly((rows.len(), 1)).iter().zip(rows) {
        let (left, right) = area.split_horizontally(560);
        overview(&left, cap)?;
        let zooms = right.split_evenly((1, cap.zooms.len().max(1)));
        for (z, &(centre, half, ref name)) in zooms.iter().zip(&cap.zooms) {
            closeup(z, cap, centre, half, name)?;
        }
    }
    root.present()?;
    Ok(())
}

/// Milliseconds from the capture's origin.
fn ms(cap: &Capture, sample: usize) -> f64 {
    (sample as f64 - cap.origin as f64) * 1000.0 / f64::from(cap.rate)
}

const RED: RGBColor = RGBColor(220, 40, 40);

/// The marks as red vertical lines (on top of the waveform), the first one labelled.
fn draw_marks<DB: DrawingBackend, X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
    cap: &Capture,
    labelled: bool,
) -> Fallible
where
    DB::ErrorType: 'static,
{
    for (i, (m0, m1, label)) in cap.marks.iter().enumerate() {
        let (a, b) = (ms(cap, *m0), ms(cap, *m1));
        let series = chart
            .draw_series([a, b].into_iter().map(|x| PathElement::new([(x, -1.05), (x, 1.05)], RED.stroke_width(2))))?;
        if labelled && i == 0 {
            series.label(label.as_str()).legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED.stroke_width(2)));
        }
    }
    Ok(())
}

fn overview<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, cap: &Capture) -> Fallible
where
    DB::ErrorType: 'static,
{
    let (a, b) = cap.overview;
    let mut chart = ChartBuilder::on(area)
        .caption(&cap.title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(ms(cap, a)..ms(cap, b), -1.05f64..1.05)?;
    chart.configure_mesh().x_desc(&cap.origin_name).y_labels(5).light_line_style(WHITE).draw()?;
    // Min to max per pixel column: the envelope of the tone, gaps and all.
    let columns = 540usize;
    let per = ((b - a) / columns).max(1);
    let envelope = (a..b).step_by(per).map(|c| {
        let chunk = &cap.samples[c..(c + per).min(b)];
        let (lo, hi) = chunk.iter().fold((f32::MAX, f32::MIN), |(l, h), &s| (l.min(s), h.max(s)));
        // Silence still shows: as a flat line at 0.
        let (lo, hi) = (f64::from(lo).min(-0.012), f64::from(hi).max(0.012));
        PathElement::new([(ms(cap, c), lo), (ms(cap, c), hi)], BLUE.stroke_width(1))
    });
    chart.draw_series(envelope)?;
    draw_marks(&mut chart, cap, true)?;
    if !cap.marks.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    Ok(())
}

fn closeup<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    cap: &Capture,
    centre: usize,
    half: usize,
    name: &str,
) -> Fallible
where
    DB::ErrorType: 'static,
{
    let (a, b) = (centre.saturating_sub(half), (centre + half).min(cap.samples.len()));
    let mut chart = ChartBuilder::on(area)
        .caption(name, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(40)
        .build_cartesian_2d(ms(cap, a)..ms(cap, b), -1.05f64..1.05)?;
    chart.configure_mesh().x_desc(&cap.origin_name).x_labels(4).y_labels(5).light_line_style(WHITE).draw()?;
    let points = (a..b).map(|i| (ms(cap, i), f64::from(cap.samples[i])));
    chart.draw_series(LineSeries::new(points, BLUE.stroke_width(1)))?;
    draw_marks(&mut chart, cap, false)?;
    Ok(())
}
