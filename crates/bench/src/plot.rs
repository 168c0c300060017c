//! A small SVG line chart, written by hand (no plotting dependency): share
//! request latency p50/p99 against online sharers on a log x axis.

use std::fmt::Write;

/// One series: label, colour, (x, y) points.
pub struct Series<'a> {
    pub label: &'a str,
    pub colour: &'a str,
    pub points: Vec<(f64, f64)>,
}

pub fn svg(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let (w, h, ml, mr, mt, mb) = (640.0, 400.0, 70.0, 150.0, 40.0, 50.0);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let (xmin, xmax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let ymax = all.iter().fold(0.0f64, |m, p| m.max(p.1)) * 1.15 + 1e-9;
    let (lx0, lx1) = (
        xmin.max(1.0).log10(),
        xmax.max(10.0).log10().max(xmin.max(1.0).log10() + 1.0),
    );
    let px = |x: f64| ml + (x.max(1.0).log10() - lx0) / (lx1 - lx0) * (w - ml - mr);
    let py = |y: f64| h - mb - y / ymax * (h - mt - mb);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" font-size="15" text-anchor="middle">{title}</text>
<line x1="{ml}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{x_label}</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{y_label}</text>
"#,
        w / 2.0,
        h - mb,
        w - mr,
        h - mb,
        h - mb,
        (ml + w - mr) / 2.0,
        h - 12.0,
        (mt + h - mb) / 2.0,
        (mt + h - mb) / 2.0,
    );
    for i in 0..=4 {
        let y = ymax * i as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{4:.0}</text>"##,
            py(y),
            w - mr,
            ml - 6.0,
            py(y) + 4.0,
            y
        );
    }
    let mut xs: Vec<f64> = all.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let label = if x >= 1e6 {
            format!("{}M", x / 1e6)
        } else {
            format!("{}k", x / 1e3)
        };
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            px(x),
            h - mb + 16.0
        );
    }
    for (k, se) in series.iter().enumerate() {
        let pts: Vec<String> = se
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            se.colour,
            pts.join(" ")
        );
        for (x, y) in &se.points {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                px(*x),
                py(*y),
                se.colour
            );
        }
        let ly = mt + 20.0 + 20.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            w - mr + 10.0,
            w - mr + 30.0,
            se.colour,
            w - mr + 36.0,
            ly + 4.0,
            se.label
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_point() {
        let s = svg(
            "t",
            "x",
            "y",
            &[Series {
                label: "p50",
                colour: "red",
                points: vec![(1e4, 100.0), (1e5, 120.0), (1e6, 130.0)],
            }],
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<circle").count(), 3);
        assert!(s.contains("1M") && s.contains("10k"));
    }
}
