//! The paper's strong-generalisation split: read one in dawenl/vae_cf's file format, or build it
//! from raw interactions (ratings ≥ threshold, users with ≥ 5 interactions, seeded user shuffle,
//! N validation and N test users, 80/20 fold-in per held-out user) and write it out.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::model::Interactions;

/// A train set plus validation and test users, each split into fold-in (`*_tr`) and held-out
/// (`*_te`) items. All matrices share the item columns `0..item_ids.len()`.
#[derive(Debug, Clone)]
pub struct Split {
    pub train: Interactions,
    pub validation_tr: Interactions,
    pub validation_te: Interactions,
    pub test_tr: Interactions,
    pub test_te: Interactions,
    /// Original item id of each column (vae_cf's `unique_sid.txt`).
    pub item_ids: Vec<String>,
    /// Original user id of each uid (train, then validation, then test), when known.
    pub user_ids: Vec<String>,
}

/// Layout of a raw interaction file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RawFormat {
    /// RecBole atomic file: tab-separated, header `user_id:token item_id:token rating:float …`.
    Inter,
    /// Comma-separated with a header naming the user, item and (optional) rating columns,
    /// e.g. MovieLens `ratings.csv` (`userId,movieId,rating,timestamp`).
    Csv,
    /// One line per user: `uid iid iid …` (every item is positive).
    Lines,
    /// `multivaed export`'s JSON lines: `{"user_id": …, "items": […]}`, items oldest first.
    Jsonl,
}

impl RawFormat {
    /// Guesses the format from the file name: `.inter`, `.csv`, else one line per user.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("inter") => Self::Inter,
            Some("csv") => Self::Csv,
            Some("jsonl") => Self::Jsonl,
            _ => Self::Lines,
        }
    }
}

/// One raw interaction.
#[derive(Debug, Clone, PartialEq)]
pub struct RawInteraction {
    pub user: String,
    pub item: String,
    pub rating: Option<f64>,
    pub timestamp: Option<f64>,
}

fn column(header: &[&str], names: &[&str]) -> Option<usize> {
    header.iter().position(|h| {
        let h = h.split(':').next().unwrap_or(h).trim().to_ascii_lowercase();
        names.iter().any(|n| h == *n)
    })
}

/// Reads a raw interaction file.
pub fn read_raw(path: &Path, format: RawFormat) -> Result<Vec<RawInteraction>> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    match format {
        RawFormat::Jsonl => {
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let e: crate::store::ExportedHistory =
                    serde_json::from_str(line).with_context(|| {
                        format!("{}:{}: not an exported history", path.display(), n + 1)
                    })?;
                // one timestamp per line: a stable sort keeps each history's order
                out.extend(e.history.items.into_iter().map(|item| RawInteraction {
                    user: e.user_id.clone(),
                    item,
                    rating: None,
                    timestamp: Some(n as f64),
                }));
            }
        }
        RawFormat::Lines => {
            for (n, line) in text.lines().enumerate() {
                let mut tok = line.split_whitespace();
                let Some(user) = tok.next() else { continue };
                for item in tok {
                    out.push(RawInteraction {
                        user: user.to_string(),
                        item: item.to_string(),
                        rating: None,
                        timestamp: Some(n as f64),
                    });
                }
            }
        }
        RawFormat::Inter | RawFormat::Csv => {
            let sep = if format == RawFormat::Inter {
                '\t'
            } else {
                ','
            };
            let mut lines = text.lines().enumerate();
            let (_, header) = lines
                .next()
                .with_context(|| format!("{}: empty file", path.display()))?;
            let header: Vec<&str> = header.split(sep).collect();
            let u = column(&header, &["user_id", "userid", "user", "uid"]).with_context(|| {
                format!("{}: no user column in header {header:?}", path.display())
            })?;
            let i = column(
                &header,
                &["item_id", "itemid", "movieid", "item", "iid", "sid"],
            )
            .with_context(|| format!("{}: no item column in header {header:?}", path.display()))?;
            let r = column(&header, &["rating", "score"]);
            let t = column(&header, &["timestamp", "time", "ts"]);
            for (n, line) in lines {
                if line.trim().is_empty() {
                    continue;
                }
                let f: Vec<&str> = line.split(sep).collect();
                let field = |c: usize| {
                    f.get(c).map(|s| s.trim()).with_context(|| {
                        format!("{}:{}: missing column {}", path.display(), n + 1, c + 1)
                    })
                };
                let num = |c: Option<usize>| -> Result<Option<f64>> {
                    match c {
                        None => Ok(None),
                        Some(c) => {
                            let s = field(c)?;
                            f64::from_str(s).map(Some).with_context(|| {
                                format!("{}:{}: {s:?} is not a number", path.display(), n + 1)
                            })
                        }
                    }
                };
                out.push(RawInteraction {
                    user: field(u)?.to_string(),
                    item: field(i)?.to_string(),
                    rating: num(r)?,
                    timestamp: num(t)?,
                });
            }
        }
    }
    Ok(out)
}

/// Ids sort numerically when they all are numbers, else as strings.
fn sort_ids(ids: &mut [String]) {
    if ids.iter().all(|s| s.parse::<u64>().is_ok()) {
        ids.sort_by_key(|s| s.parse::<u64>().unwrap_or(u64::MAX));
    } else {
        ids.sort();
    }
}

/// Builds the paper's split: keep `rating >= min_rating` (where there are ratings), users with
/// at least 5 interactions, shuffle users with `seed`, hold out `heldout_users` validation and as
/// many test users, items = those of the training users, and per held-out user with ≥ 5 items
/// a random 20% to held-out, the rest to fold-in.
pub fn build_split(
    raw: &[RawInteraction],
    min_rating: f64,
    heldout_users: usize,
    seed: u64,
) -> Result<Split> {
    let mut by_user: HashMap<&str, HashSet<&str>> = HashMap::new();
    for r in raw {
        if r.rating.is_none_or(|x| x >= min_rating) {
            by_user.entry(&r.user).or_default().insert(&r.item);
        }
    }
    let mut users: Vec<String> = by_user
        .iter()
        .filter(|(_, items)| items.len() >= 5)
        .map(|(u, _)| u.to_string())
        .collect();
    sort_ids(&mut users);
    let n = users.len();
    if heldout_users == 0 || n <= 2 * heldout_users {
        bail!("{n} users with at least 5 interactions: too few to hold out 2 × {heldout_users}");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    users.shuffle(&mut rng);
    let n_train = n - 2 * heldout_users;
    let sorted_items = |u: &str| -> Vec<String> {
        let mut v: Vec<String> = by_user[u].iter().map(|s| s.to_string()).collect();
        sort_ids(&mut v);
        v
    };
    // item vocabulary: first appearance over training users in sorted-id order (vae_cf's
    // pd.unique over rows sorted by user, then item)
    let mut train_sorted: Vec<String> = users[..n_train].to_vec();
    sort_ids(&mut train_sorted);
    let mut item_ids = Vec::new();
    let mut item_index: HashMap<String, u32> = HashMap::new();
    for u in &train_sorted {
        for i in sorted_items(u) {
            if !item_index.contains_key(&i) {
                item_index.insert(i.clone(), item_ids.len() as u32);
                item_ids.push(i);
            }
        }
    }
    let n_items = item_ids.len();
    let index_items = |u: &str| -> Vec<u32> {
        sorted_items(u)
            .iter()
            .filter_map(|i| item_index.get(i).copied())
            .collect()
    };
    let train = Interactions::from_rows(users[..n_train].iter().map(|u| index_items(u)), n_items)
        .map_err(anyhow::Error::msg)?;
    let mut held_out = |group: &[String]| -> Result<(Interactions, Interactions)> {
        let (mut tr, mut te) = (Interactions::new(n_items), Interactions::new(n_items));
        for u in group {
            let items = index_items(u);
            let n_u = items.len();
            let mut is_te = vec![false; n_u];
            if n_u >= 5 {
                for k in rand::seq::index::sample(&mut rng, n_u, n_u / 5) {
                    is_te[k] = true;
                }
            }
            tr.push_row(
                items
                    .iter()
                    .zip(&is_te)
                    .filter(|(_, t)| !**t)
                    .map(|(i, _)| *i),
            )
            .map_err(anyhow::Error::msg)?;
            te.push_row(
                items
                    .iter()
                    .zip(&is_te)
                    .filter(|(_, t)| **t)
                    .map(|(i, _)| *i),
            )
            .map_err(anyhow::Error::msg)?;
        }
        Ok((tr, te))
    };
    let (validation_tr, validation_te) = held_out(&users[n_train..n_train + heldout_users])?;
    let (test_tr, test_te) = held_out(&users[n_train + heldout_users..])?;
    Ok(Split {
        train,
        validation_tr,
        validation_te,
        test_tr,
        test_te,
        item_ids,
        user_ids: users,
    })
}

impl Split {
    /// The same split with each fold-in and training interaction weighted by its rating in
    /// `raw` (1 where it has none): the input of a weighted model. Held-out items stay binary
    /// (relevance, as in the paper's metrics).
    pub fn weighted_by_rating(mut self, raw: &[RawInteraction]) -> Result<Self> {
        let ratings: HashMap<(&str, &str), f32> = raw
            .iter()
            .filter_map(|r| Some(((r.user.as_str(), r.item.as_str()), r.rating? as f32)))
            .collect();
        let (n_train, n_val) = (self.train.n_users(), self.validation_tr.n_users());
        if self.user_ids.len() != n_train + n_val + self.test_tr.n_users() {
            bail!("the split does not name its users: ratings cannot be matched");
        }
        let reweight = |m: &Interactions, users: &[String]| -> Result<Interactions> {
            let mut w = Interactions::new_weighted(m.n_items());
            for (u, user) in users.iter().enumerate() {
                w.push_pairs(m.row(u).iter().map(|&i| {
                    let item = self.item_ids[i as usize].as_str();
                    let r = ratings.get(&(user.as_str(), item)).copied();
                    (i, r.filter(|r| *r > 0.0).unwrap_or(1.0))
                }))
                .map_err(anyhow::Error::msg)?;
            }
            Ok(w)
        };
        let users = &self.user_ids;
        let train = reweight(&self.train, &users[..n_train])?;
        let validation_tr = reweight(&self.validation_tr, &users[n_train..n_train + n_val])?;
        let test_tr = reweight(&self.test_tr, &users[n_train + n_val..])?;
        self.train = train;
        self.validation_tr = validation_tr;
        self.test_tr = test_tr;
        Ok(self)
    }
}

fn read_pairs(path: &Path) -> Result<Vec<(u64, u32)>> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim() == "uid,sid" => {}
        other => bail!(
            "{}: expected the header \"uid,sid\", found {:?}",
            path.display(),
            other.map(|(_, h)| h)
        ),
    }
    let mut out = Vec::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let (u, s) = line
            .split_once(',')
            .with_context(|| format!("{}:{}: expected uid,sid", path.display(), n + 1))?;
        let u = u.trim().parse::<u64>();
        let s = s.trim().parse::<u32>();
        match (u, s) {
            (Ok(u), Ok(s)) => out.push((u, s)),
            _ => bail!("{}:{}: {line:?} is not two integers", path.display(), n + 1),
        }
    }
    Ok(out)
}

fn to_matrix(
    pairs: &[(u64, u32)],
    start: u64,
    n_rows: usize,
    n_items: usize,
    path: &Path,
) -> Result<Interactions> {
    let mut rows = vec![Vec::new(); n_rows];
    for &(u, s) in pairs {
        if s as usize >= n_items {
            bail!(
                "{}: sid {s} is not in unique_sid.txt ({n_items} items)",
                path.display()
            );
        }
        rows[(u - start) as usize].push(s);
    }
    Interactions::from_rows(rows, n_items).map_err(anyhow::Error::msg)
}

/// Reads a split directory in vae_cf's format.
pub fn read_split_dir(dir: &Path) -> Result<Split> {
    let p = |n: &str| -> PathBuf { dir.join(n) };
    let sid_path = p("unique_sid.txt");
    let item_ids: Vec<String> = fs::read_to_string(&sid_path)
        .with_context(|| format!("cannot read {}", sid_path.display()))?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let n_items = item_ids.len();
    let train_pairs = read_pairs(&p("train.csv"))?;
    let n_train = train_pairs.iter().map(|(u, _)| u + 1).max().unwrap_or(0) as usize;
    let train = to_matrix(&train_pairs, 0, n_train, n_items, &p("train.csv"))?;
    let tr_te = |tr: &str, te: &str| -> Result<(Interactions, Interactions)> {
        let a = read_pairs(&p(tr))?;
        let b = read_pairs(&p(te))?;
        let start = a.iter().chain(&b).map(|x| x.0).min().unwrap_or(0);
        let end = a.iter().chain(&b).map(|x| x.0).max().unwrap_or(0);
        let n = if a.is_empty() && b.is_empty() {
            0
        } else {
            (end - start + 1) as usize
        };
        Ok((
            to_matrix(&a, start, n, n_items, &p(tr))?,
            to_matrix(&b, start, n, n_items, &p(te))?,
        ))
    };
    let (validation_tr, validation_te) = tr_te("validation_tr.csv", "validation_te.csv")?;
    let (test_tr, test_te) = tr_te("test_tr.csv", "test_te.csv")?;
    let user_ids = fs::read_to_string(p("unique_uid.txt"))
        .map(|t| t.lines().map(|l| l.trim().to_string()).collect())
        .unwrap_or_default();
    Ok(Split {
        train,
        validation_tr,
        validation_te,
        test_tr,
        test_te,
        item_ids,
        user_ids,
    })
}

/// Writes a split in vae_cf's format (uids: training users, then validation, then test).
pub fn write_split_dir(split: &Split, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, text: String| -> Result<()> {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    let csv = |m: &Interactions, first_uid: usize| {
        let mut s = String::from("uid,sid\n");
        for (u, row) in m.rows().enumerate() {
            for i in row {
                let _ = writeln!(s, "{},{}", first_uid + u, i);
            }
        }
        s
    };
    let n_tr = split.train.n_users();
    let n_vd = split.validation_tr.n_users();
    write("train.csv", csv(&split.train, 0))?;
    write("validation_tr.csv", csv(&split.validation_tr, n_tr))?;
    write("validation_te.csv", csv(&split.validation_te, n_tr))?;
    write("test_tr.csv", csv(&split.test_tr, n_tr + n_vd))?;
    write("test_te.csv", csv(&split.test_te, n_tr + n_vd))?;
    write(
        "unique_sid.txt",
        split.item_ids.iter().map(|s| format!("{s}\n")).collect(),
    )?;
    if !split.user_ids.is_empty() {
        write(
            "unique_uid.txt",
            split.user_ids.iter().map(|s| format!("{s}\n")).collect(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_reads_back_as_the_same_histories() {
        use crate::store::{Click, Store};
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 10).unwrap();
        let click = Click::new;
        s.apply(&[click("b", "i2"), click("a", "i1"), click("b", "i1")], &[])
            .unwrap();
        let mut lines = Vec::new();
        let n = s
            .export(|user, items| {
                lines
                    .push(serde_json::json!({ "user_id": user, "items": items.items }).to_string());
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            lines,
            [
                r#"{"items":["i1"],"user_id":"a"}"#,
                r#"{"items":["i2","i1"],"user_id":"b"}"#
            ]
        );
        let file = dir.path().join("export.jsonl");
        std::fs::write(&file, lines.join("\n")).unwrap();
        let raw = read_raw(&file, RawFormat::from_path(&file)).unwrap();
        let pairs: Vec<(&str, &str)> = raw
            .iter()
            .map(|r| (r.user.as_str(), r.item.as_str()))
            .collect();
        assert_eq!(pairs, [("a", "i1"), ("b", "i2"), ("b", "i1")]);
    }

    fn synthetic(n_users: usize) -> Vec<RawInteraction> {
        let mut out = Vec::new();
        for u in 0..n_users {
            for k in 0..(3 + u % 9) {
                out.push(RawInteraction {
                    user: format!("{u}"),
                    item: format!("{}", (u * 7 + k * 3) % 40),
                    rating: Some(if k % 4 == 0 { 2.0 } else { 5.0 }),
                    timestamp: None,
                });
            }
        }
        out
    }

    #[test]
    fn split_follows_the_paper_rules_and_round_trips() {
        let raw = synthetic(200);
        let split = build_split(&raw, 4.0, 20, 98765).unwrap();
        // every kept user has >= 5 positive interactions
        let kept = split.train.n_users() + 40;
        assert_eq!(split.validation_tr.n_users(), 20);
        assert_eq!(split.test_tr.n_users(), 20);
        assert_eq!(split.user_ids.len(), kept);
        for m in [&split.validation_tr, &split.test_tr] {
            assert_eq!(m.n_items(), split.item_ids.len());
        }
        // 20% held out (floor) for users with >= 5 items in the vocabulary
        for (tr, te) in split.test_tr.rows().zip(split.test_te.rows()) {
            let n = tr.len() + te.len();
            assert_eq!(te.len(), if n >= 5 { n / 5 } else { 0 });
            assert!(tr.iter().all(|i| te.binary_search(i).is_err()));
        }
        // same seed, same split; another seed, another user order
        let again = build_split(&raw, 4.0, 20, 98765).unwrap();
        assert_eq!(again.user_ids, split.user_ids);
        assert_eq!(again.test_te, split.test_te);
        let other = build_split(&raw, 4.0, 20, 1).unwrap();
        assert_ne!(other.user_ids, split.user_ids);

        let dir = tempfile::tempdir().unwrap();
        write_split_dir(&split, dir.path()).unwrap();
        let back = read_split_dir(dir.path()).unwrap();
        assert_eq!(back.train, split.train);
        assert_eq!(back.validation_tr, split.validation_tr);
        assert_eq!(back.validation_te, split.validation_te);
        assert_eq!(back.test_tr, split.test_tr);
        assert_eq!(back.test_te, split.test_te);
        assert_eq!(back.item_ids, split.item_ids);
    }

    #[test]
    fn raw_formats_parse() {
        let dir = tempfile::tempdir().unwrap();
        let inter = dir.path().join("x.inter");
        fs::write(&inter, "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t5\n2\t11\t3\t6\n").unwrap();
        let r = read_raw(&inter, RawFormat::from_path(&inter)).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[1].user.as_str(), r[1].item.as_str(), r[1].rating),
            ("2", "11", Some(3.0))
        );
        let csv = dir.path().join("ratings.csv");
        fs::write(&csv, "userId,movieId,rating,timestamp\n1,10,4.5,5\n").unwrap();
        let r = read_raw(&csv, RawFormat::from_path(&csv)).unwrap();
        assert_eq!(r[0].rating, Some(4.5));
        let lines = dir.path().join("train.txt");
        fs::write(&lines, "0 1 2 3\n1 4\n").unwrap();
        let r = read_raw(&lines, RawFormat::from_path(&lines)).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[3].user, "1");
        let bad = dir.path().join("bad.csv");
        fs::write(&bad, "a,b\n1,2\n").unwrap();
        let e = read_raw(&bad, RawFormat::Csv).unwrap_err().to_string();
        assert!(e.contains("no user column"), "{e}");
        let bad = dir.path().join("bad2.csv");
        fs::write(&bad, "user,item,rating\n1,2,x\n").unwrap();
        assert!(read_raw(&bad, RawFormat::Csv)
            .unwrap_err()
            .to_string()
            .contains("not a number"));
    }
}
