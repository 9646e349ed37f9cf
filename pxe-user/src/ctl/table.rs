//! Plain text tables for `pxed ctl`: columns padded to their widest cell,
//! two spaces apart, so `column`, `awk` and a reader all take them.

/// Rows under a header; every row has as many cells as the header.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Self {
        Self {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len(), "one cell per column");
        self.rows.push(cells);
    }

    /// The header and the rows, one line each (the last column unpadded).
    pub fn render(&self) -> String {
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        lines(std::iter::once(&header).chain(&self.rows))
    }
}

/// `key  value` lines, the keys padded: one record shown whole.
pub fn pairs(pairs: &[(&str, String)]) -> String {
    let rows: Vec<Vec<String>> = pairs
        .iter()
        .map(|(k, v)| vec![(*k).to_owned(), v.clone()])
        .collect();
    lines(rows.iter())
}

fn lines<'a>(rows: impl Iterator<Item = &'a Vec<String>> + Clone) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows.clone() {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) => *max = (*max).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_lines_end_without_padding() {
        let mut t = Table::new(&["MAC", "PROFILE", "SOURCE"]);
        t.row(vec![
            "52:54:00:00:60:02".into(),
            "installer".into(),
            "api".into(),
        ]);
        t.row(vec!["52:54:00:00:60:09".into(), "-".into(), "file".into()]);
        assert_eq!(
            t.render(),
            "MAC                PROFILE    SOURCE\n\
             52:54:00:00:60:02  installer  api\n\
             52:54:00:00:60:09  -          file\n"
        );
        assert_eq!(
            pairs(&[("mac", "m".into()), ("netboot", "true".into())]),
            "mac      m\nnetboot  true\n"
        );
    }
}
