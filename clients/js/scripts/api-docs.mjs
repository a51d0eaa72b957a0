// Writes the API reference in README.md (between <!-- api:start --> and <!-- api:end -->)
// from the type declarations, src/tandem.d.ts and src/react.d.ts: every export with its
// signature and its doc comment. `--check`: change nothing, fail if README.md is stale.
//
//   npm run docs
//   node scripts/api-docs.mjs --check

import ts from 'typescript';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const check = process.argv.includes('--check');

/** The doc comment of a node, on one line. */
function doc(node, sf) {
  const ranges = ts.getLeadingCommentRanges(sf.text, node.getFullStart()) ?? [];
  const last = ranges.filter((r) => sf.text.slice(r.pos, r.pos + 3) === '/**').at(-1);
  if (!last) return '';
  return sf.text
    .slice(last.pos + 3, last.end - 2)
    .split('\n')
    .map((l) => l.replace(/^\s*\*?\s?/, ''))
    .join(' ')
    .replace(/\s+/g, ' ')
    .trim();
}

/** A declaration's text without its doc comments or body, on one line. */
function signature(node, sf) {
  let text = sf.text.slice(node.getStart(sf), node.getEnd());
  text = text.replace(/\/\*\*[\s\S]*?\*\//g, '').replace(/\s+/g, ' ').replace(/;$/, '').trim();
  return text.replace(/^export (declare )?/, '');
}

const esc = (s) => s.replace(/\|/g, '\\|');

function members(node, sf) {
  const rows = [];
  for (const m of node.members) {
    const mods = ts.getCombinedModifierFlags(m);
    if (mods & ts.ModifierFlags.Private) continue;
    rows.push(`| \`${esc(signature(m, sf))}\` | ${esc(doc(m, sf))} |`);
  }
  return rows;
}

function section(file, title) {
  const path = join(root, file);
  const sf = ts.createSourceFile(path, readFileSync(path, 'utf8'), ts.ScriptTarget.ES2022, true);
  const out = [`### ${title}`, ''];
  /** Declarations that are not exported (e.g. the event maps) are listed when an export names them. */
  for (const st of sf.statements) {
    const exported = ts.canHaveModifiers(st) && (ts.getModifiers(st) ?? []).some((m) => m.kind === ts.SyntaxKind.ExportKeyword);
    const isEvents = ts.isInterfaceDeclaration(st) && /Events$/.test(st.name.text);
    if (!exported && !isEvents) continue;
    const d = doc(st, sf);
    if (ts.isClassDeclaration(st) || ts.isInterfaceDeclaration(st)) {
      const kind = ts.isClassDeclaration(st) ? 'class' : isEvents ? 'events' : 'interface';
      const heads = (st.heritageClauses ?? []).map((h) => h.getText(sf)).join(' ');
      out.push(`#### \`${st.name.text}\` (${kind}${heads ? `, ${heads}` : ''})`, '');
      if (d) out.push(d, '');
      const rows = members(st, sf);
      if (rows.length) out.push('| Member | |', '|---|---|', ...rows, '');
    } else {
      out.push(`- \`${esc(signature(st, sf))}\`${d ? ` — ${d}` : ''}`);
      if (st === sf.statements.at(-1) || !isPlain(sf.statements[sf.statements.indexOf(st) + 1])) out.push('');
    }
  }
  return out.join('\n').replace(/\n{3,}/g, '\n\n').trim();
}

/** A statement listed as a bullet (not a class or interface heading). */
function isPlain(st) {
  return st && !ts.isClassDeclaration(st) && !ts.isInterfaceDeclaration(st);
}

const generated = [
  '<!-- api:start (npm run docs writes this from src/tandem.d.ts and src/react.d.ts) -->',
  '',
  section('src/tandem.d.ts', '`@tandem/client` (src/tandem.d.ts)'),
  '',
  section('src/react.d.ts', '`@tandem/client/react` (src/react.d.ts)'),
  '',
  '<!-- api:end -->',
].join('\n');

const readmePath = join(root, 'README.md');
const readme = readFileSync(readmePath, 'utf8');
const marked = /<!-- api:start[^>]*-->[\s\S]*?<!-- api:end -->/;
if (!marked.test(readme)) throw new Error('README.md has no <!-- api:start --> … <!-- api:end --> block');
const next = readme.replace(marked, generated);
if (check) {
  if (next !== readme) {
    console.error('README.md API reference is stale: run `npm run docs` in clients/js and commit README.md');
    process.exit(1);
  }
  console.log('README.md API reference is up to date');
} else {
  writeFileSync(readmePath, next);
  console.log('README.md API reference written');
}
