//! The SVG chart of a run: latency percentiles (ping-pong and the headline HTTP cell) and
//! throughput (new connections, bulk) per scenario. SVG only: text is written as `<text>`
//! elements, so no font library is needed to build or draw.

use std::path::Path;

use anyhow::Result;
use plotters::{coord::Shift, prelude::*};

use super::{
    report::{self, num},
    results::BenchRun,
    scenario::Scenario,
    summary::{Percentiles, Spread},
};

const SIZE: (u32, u32) = (1400, 900);
const PERCENTILE_LABELS: [&str; 4] = ["p50", "p90", "p99", "p99.9"];

pub fn draw(bench: &BenchRun, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "eBPF vs iptables redirection, kernel {}, {} repetitions{}",
        bench.meta.kernel,
        bench.meta.reps,
        if bench.meta.quick { " (quick run)" } else { "" }
    );
    let root = root.titled(&title, ("sans-serif", 26))?;
    let panels = root.split_evenly((2, 2));
    let summary = &bench.summary;
    let latencies = |cell: &str| -> Vec<(Scenario, Percentiles)> {
        bench
            .scenarios
            .iter()
            .filter_map(|&s| Some((s, summary.cell(s, cell)?.latency_us?)))
            .collect()
    };
    let throughputs = |cell: &str| -> Vec<(Scenario, Spread)> {
        bench
            .scenarios
            .iter()
            .filter_map(|&s| Some((s, summary.cell(s, cell)?.throughput?)))
            .collect()
    };
    let http_cell = report::headline_http_cell(bench);
    percentile_panel(
        &panels[0],
        "Ping-pong round trip, µs (log scale)",
        &latencies("ping-pong"),
    )?;
    let http_id = http_cell.map_or("", |cell| cell.id.as_str());
    percentile_panel(
        &panels[1],
        &format!("HTTP {http_id}, µs from intended send (log scale)"),
        &latencies(http_id),
    )?;
    bar_panel(
        &panels[2],
        "New connections per second (median, min-max)",
        &throughputs("crr"),
    )?;
    bar_panel(
        &panels[3],
        "Bulk Gbit/s (median, min-max)",
        &throughputs("bulk"),
    )?;
    root.present()?;
    Ok(())
}

fn color(scenario: Scenario) -> RGBColor {
    match scenario {
        Scenario::B0 => RGBColor(120, 120, 120),
        Scenario::P0 => RGBColor(31, 119, 180),
        Scenario::B0Ct => RGBColor(170, 170, 170),
        Scenario::P0Ct => RGBColor(120, 170, 220),
        Scenario::I1 => RGBColor(255, 127, 14),
        Scenario::E1 => RGBColor(44, 160, 44),
        Scenario::H1 => RGBColor(148, 103, 189),
        Scenario::I2 => RGBColor(214, 39, 40),
        Scenario::E2 => RGBColor(23, 190, 207),
        Scenario::E2s => RGBColor(0, 128, 128),
        Scenario::I2Mtls => RGBColor(140, 86, 75),
        Scenario::E2Mtls => RGBColor(188, 189, 34),
        Scenario::H1Http => RGBColor(197, 176, 213),
        Scenario::I1Http => RGBColor(255, 187, 120),
        Scenario::E1Http => RGBColor(152, 223, 138),
        Scenario::E2Http => RGBColor(158, 218, 229),
        Scenario::E2MtlsHttp => RGBColor(219, 219, 141),
    }
}

fn not_run<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, caption: &str) -> Result<()>
where
    DB::ErrorType: 'static,
{
    area.titled(caption, ("sans-serif", 20))?.draw_text(
        "not run",
        &("sans-serif", 16).into_text_style(area),
        (40, 40),
    )?;
    Ok(())
}

fn percentile_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    series: &[(Scenario, Percentiles)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    if series.is_empty() {
        return not_run(area, caption);
    }
    let values = |p: &Percentiles| [p.p50, p.p90, p.p99, p.p999];
    let all = series.iter().flat_map(|(_, p)| values(p));
    let low = all.clone().fold(f64::INFINITY, f64::min).max(0.1) * 0.8;
    let high = all.fold(0.0, f64::max) * 1.25;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.3f64..3.3f64, (low..high).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(4)
        .x_label_formatter(&|x| {
            let index = x.round();
            if (x - index).abs() < 0.01 && (0.0..4.0).contains(&index) {
                PERCENTILE_LABELS[index as usize].to_owned()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| num(*y))
        .disable_x_mesh()
        .draw()?;
    for (scenario, percentiles) in series {
        let color = color(*scenario);
        let points: Vec<(f64, f64)> = values(percentiles)
            .into_iter()
            .enumerate()
            .map(|(i, value)| (i as f64, value))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(scenario.to_string())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|point| Circle::new(point, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;
    Ok(())
}

fn bar_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    bars: &[(Scenario, Spread)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    if bars.is_empty() {
        return not_run(area, caption);
    }
    let high = bars.iter().map(|(_, s)| s.max).fold(0.0, f64::max) * 1.15;
    let names: Vec<String> = bars.iter().map(|(s, _)| s.to_string()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(bars.len() as f64 - 0.5), 0f64..high)?;
    chart
        .configure_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|x| {
            let index = x.round();
            if (x - index).abs() < 0.01 && index >= 0.0 {
                names.get(index as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| num(*y))
        .disable_x_mesh()
        .draw()?;
    for (index, (scenario, spread)) in bars.iter().enumerate() {
        let x = index as f64;
        chart.draw_series([Rectangle::new(
            [(x - 0.3, 0.0), (x + 0.3, spread.median)],
            color(*scenario).filled(),
        )])?;
        chart.draw_series([PathElement::new(
            vec![(x, spread.min), (x, spread.max)],
            BLACK.stroke_width(2),
        )])?;
        chart.draw_series([Text::new(
            num(spread.median),
            (x + 0.04, spread.median + high * 0.02),
            ("sans-serif", 14),
        )])?;
    }
    Ok(())
}
