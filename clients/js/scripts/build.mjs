// Builds dist/tandem.min.js (minified with esbuild) and dist/tandem.min.js.gz from
// src/tandem.js, and writes the bundle sizes (minified, minified + gzip) into README.md.
// The gateway embeds the committed files (served at /sdk/<version>/tandem.js), so a cargo
// build needs no node. `--check`: change nothing, fail if the committed files are stale.
//
//   npm run build            # after editing src/
//   node scripts/build.mjs --check

import { build } from 'esbuild';
import { readFileSync, writeFileSync, mkdirSync, existsSync } from 'node:fs';
import { gzipSync, gunzipSync } from 'node:zlib';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const check = process.argv.includes('--check');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));

/** Minified ES module text of one entry (no bundling: the SDK has no dependencies, the
 * React entry keeps `react` and `./tandem.js` as imports). */
async function minify(entry, banner) {
  const out = await build({
    entryPoints: [join(root, entry)],
    bundle: false,
    minify: true,
    format: 'esm',
    target: 'es2022',
    legalComments: 'none',
    banner: { js: banner },
    write: false,
  });
  return out.outputFiles[0].text;
}

const min = await minify('src/tandem.js', `/*! ${pkg.name} ${pkg.version} | ${pkg.license} */`);
const reactMin = await minify('src/react.js', '');
const gz = gzipSync(min, { level: 9 });
const sizes = {
  source: Buffer.byteLength(readFileSync(join(root, 'src/tandem.js'))),
  min: Buffer.byteLength(min),
  gzip: gz.length,
  reactMin: Buffer.byteLength(reactMin),
  reactGzip: gzipSync(reactMin, { level: 9 }).length,
};
const kb = (n) => `${(n / 1024).toFixed(1)} kB`;
const table = [
  '<!-- size:start (npm run build writes this) -->',
  '| File | Source | Minified | Minified + gzip |',
  '|---|---|---|---|',
  `| \`tandem.js\` ${pkg.version} | ${kb(sizes.source)} | ${kb(sizes.min)} (${sizes.min} B) | **${kb(sizes.gzip)}** (${sizes.gzip} B) |`,
  `| \`react.js\` (hooks; React not counted) | ${kb(Buffer.byteLength(readFileSync(join(root, 'src/react.js'))))} | ${kb(sizes.reactMin)} | ${kb(sizes.reactGzip)} |`,
  '<!-- size:end -->',
].join('\n');

const readmePath = join(root, 'README.md');
const readme = readFileSync(readmePath, 'utf8');
const marked = /<!-- size:start[^>]*-->[\s\S]*?<!-- size:end -->/;
if (!marked.test(readme)) throw new Error('README.md has no <!-- size:start --> … <!-- size:end --> block');
const newReadme = readme.replace(marked, table);

if (check) {
  const problems = [];
  const minPath = join(root, 'dist/tandem.min.js');
  const gzPath = join(root, 'dist/tandem.min.js.gz');
  if (!existsSync(minPath) || readFileSync(minPath, 'utf8') !== min) problems.push('dist/tandem.min.js is not the minified src/tandem.js');
  if (!existsSync(gzPath) || gunzipSync(readFileSync(gzPath)).toString('utf8') !== min) problems.push('dist/tandem.min.js.gz is not dist/tandem.min.js gzipped');
  // gzip output may differ by a few bytes between zlib builds: compare the minified size
  // exactly and the gzip size within 1%.
  const m = readme.match(/`tandem\.js` (\S+) \| [^|]+\| [^(]+\((\d+) B\) \| \*\*[^*]+\*\* \((\d+) B\)/);
  if (!m || m[1] !== pkg.version || Number(m[2]) !== sizes.min || Math.abs(Number(m[3]) - sizes.gzip) > sizes.gzip / 100) {
    problems.push(`README.md's bundle size is stale (now ${sizes.min} B minified, ${sizes.gzip} B gzip)`);
  }
  if (problems.length) {
    console.error(problems.join('\n') + '\nrun `npm run build` in clients/js and commit the result');
    process.exit(1);
  }
  console.log(`dist/ and README.md are up to date (${sizes.min} B minified, ${sizes.gzip} B gzip)`);
} else {
  mkdirSync(join(root, 'dist'), { recursive: true });
  writeFileSync(join(root, 'dist/tandem.min.js'), min);
  writeFileSync(join(root, 'dist/tandem.min.js.gz'), gz);
  writeFileSync(readmePath, newReadme);
  console.log(`dist/tandem.min.js: ${sizes.min} B, gzip ${sizes.gzip} B (source ${sizes.source} B); README.md updated`);
}
