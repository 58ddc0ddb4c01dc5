//! The demo's picture: per-uplink and total throughput over time (SVG, plotters), the
//! single-link phase shaded, each scripted event a vertical line with its caption.

use std::path::Path;

use plotters::prelude::*;

/// One line of the plot: `(seconds, Mbit/s)` points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A vertical mark: `(seconds, caption, is a failure)`.
pub struct Mark {
    pub at: f64,
    pub caption: String,
    pub failure: bool,
}

pub struct Plot<'a> {
    pub title: String,
    pub uplinks: &'a [Series],
    pub total: &'a Series,
    pub download: &'a Series,
    /// The single-link phase, `(from, to)` seconds.
    pub alone: Option<(f64, f64)>,
    pub marks: &'a [Mark],
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
];

pub fn write_svg(path: &Path, p: &Plot) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let end = p.total.points.last().map_or(1.0, |(t, _)| *t).max(1.0);
    let top = p
        .total
        .points
        .iter()
        .chain(&p.download.points)
        .map(|(_, v)| *v)
        .fold(1.0_f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(&p.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("throughput (Mbit/s)")
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    if let Some((a, b)) = p.alone {
        chart.draw_series(std::iter::once(Rectangle::new(
            [(a, 0.0), (b, top)],
            RGBColor(238, 238, 238).filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            "each link alone",
            (a + 0.2, top * 0.97),
            ("sans-serif", 14),
        )))?;
    }
    for (i, m) in p.marks.iter().enumerate() {
        let color = if m.failure {
            RGBColor(214, 39, 40)
        } else {
            RGBColor(44, 160, 44)
        };
        chart.draw_series(LineSeries::new(
            [(m.at, 0.0), (m.at, top)],
            color.stroke_width(1),
        ))?;
        // Alternate heights so that captions of close events do not overlap.
        let y = top * if i % 2 == 0 { 0.91 } else { 0.85 };
        chart.draw_series(std::iter::once(Text::new(
            m.caption.clone(),
            (m.at + 0.15, y),
            ("sans-serif", 13).into_font().color(&color),
        )))?;
    }
    for (i, s) in p.uplinks.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))?
            .label(format!("{} (Mbit/s on the link)", s.name))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(
            p.total.points.iter().copied(),
            BLACK.stroke_width(3),
        ))?
        .label(p.total.name.clone())
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(3)));
    let grey = RGBColor(120, 120, 120);
    chart
        .draw_series(DashedLineSeries::new(
            p.download.points.iter().copied(),
            6,
            4,
            grey.stroke_width(2),
        ))?
        .label(p.download.name.clone())
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], grey.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_svg_has_a_line_per_uplink_the_total_and_the_events() {
        let dir = std::env::temp_dir().join(format!("braid-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.svg");
        let line = |name: &str, k: f64| Series {
            name: name.into(),
            points: (0..40).map(|i| (f64::from(i) * 0.5, k)).collect(),
        };
        let uplinks = [line("dsl", 19.0), line("lte", 28.0)];
        write_svg(
            &path,
            &Plot {
                title: "t".into(),
                uplinks: &uplinks,
                total: &line("total", 47.0),
                download: &line("download", 44.0),
                alone: Some((0.0, 4.0)),
                marks: &[Mark {
                    at: 9.0,
                    caption: "lte cut".into(),
                    failure: true,
                }],
            },
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        for want in ["dsl (Mbit/s", "lte (Mbit/s", "total", "lte cut", "time (s)"] {
            assert!(svg.contains(want), "{want} missing");
        }
        assert!(svg.matches("<polyline").count() >= 4, "{svg}");
    }
}
