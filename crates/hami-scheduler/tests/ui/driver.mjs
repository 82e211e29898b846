// Headless-Chromium driver for the hami-scheduler dashboard e2e test.
//
//   HAMI_UI_NODE_MODULES=<dir holding node_modules/playwright-core>
//   HAMI_CHROMIUM=/usr/bin/chromium
//   node driver.mjs http://127.0.0.1:PORT/ui
//
// Protocol (line based, so the Rust test needs no JS knowledge):
//   stdout: `ready` once the page rendered data (body.dataset.updated >= 1),
//           or `fail <why>` and exit 1 if that takes over 30 s.
//   stdin:  one command per line; each gets exactly one stdout line,
//           `ok[ <value>]` or `fail <why>`, and the driver keeps going.
//     wait-testid <id> <timeout_ms>        element visible
//     wait-gone <id> <timeout_ms>          no element with that id
//     text <id>                            ok <textContent, whitespace collapsed>
//     wait-text <id> <substring> <timeout_ms>   (substring may contain spaces)
//     theme <light|dark> [timeout_ms]      emulate the scheme, drop the saved
//                                          choice, wait for the next render
//     screenshot <path>                    full-page PNG
//     console-errors                       ok <n> (messages go to stderr)
//     quit                                 ok, close the browser, exit 0
// Blank lines are ignored. stdin EOF behaves like quit (without the answer).
// <id> is the data-testid value; when several elements share it (a pod that
// spans two cards), commands act on the first one, wait-text on any of them.
import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';

// Must match THEME_KEY in crates/hami-scheduler/src/ui/index.html.
const THEME_KEY = 'hami-theme';
const READY_TIMEOUT_MS = 30_000;
const TEXT_TIMEOUT_MS = 5_000;

// One line per answer, always: multi-line Playwright errors are collapsed.
// Playwright call logs carry ANSI colour codes: strip them too.
const oneLine = (s) => String(s).replace(/\x1b\[[0-9;]*m/g, '').replace(/\s+/g, ' ').trim();
const say = (line) => process.stdout.write(oneLine(line) + '\n');
const why = (e) => oneLine(e && e.message ? e.message : e).slice(0, 600);

function die(msg) {
  say(`fail ${msg}`);
  process.exit(1);
}

const url = process.argv[2];
if (!url) die('usage: driver.mjs <page-url>');
const modules = process.env.HAMI_UI_NODE_MODULES;
const chromiumPath = process.env.HAMI_CHROMIUM;
if (!modules) die('HAMI_UI_NODE_MODULES is not set');
if (!chromiumPath) die('HAMI_CHROMIUM is not set');

let chromium;
try {
  // Resolve from the given directory (works for both the npm --prefix dir and
  // its node_modules), not from this file's location in the repo.
  ({ chromium } = createRequire(path.join(modules, 'x'))('playwright-core'));
} catch (e) {
  die(`cannot load playwright-core from ${modules}: ${why(e)}`);
}

const errors = [];
let browser;
let page;

async function start() {
  const t0 = Date.now();
  browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    // --no-sandbox: CI runs as root; /dev/shm is tiny in containers.
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'],
  });
  const context = await browser.newContext({ viewport: { width: 1366, height: 768 } });
  page = await context.newPage();
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  page.on('crash', () => errors.push('page crashed'));
  await page.goto(url, { timeout: READY_TIMEOUT_MS, waitUntil: 'domcontentloaded' });
  const left = Math.max(1000, READY_TIMEOUT_MS - (Date.now() - t0));
  await page.waitForFunction(() => Number(document.body.dataset.updated || 0) >= 1, null, {
    timeout: left,
    polling: 100,
  });
}

const updatedCount = () => page.evaluate(() => Number(document.body.dataset.updated || 0));

function ms(s) {
  const n = Number(s);
  if (!Number.isFinite(n) || n < 0 || s === undefined || s === '') throw new Error(`bad timeout: ${s}`);
  return n;
}

const handlers = {
  async 'wait-testid'([id, t]) {
    await page.getByTestId(id).first().waitFor({ state: 'visible', timeout: ms(t) });
    return 'ok';
  },

  async 'wait-gone'([id, t]) {
    await page.getByTestId(id).first().waitFor({ state: 'detached', timeout: ms(t) });
    return 'ok';
  },

  async text([id]) {
    const s = await page.getByTestId(id).first().textContent({ timeout: TEXT_TIMEOUT_MS });
    return `ok ${oneLine(s ?? '')}`;
  },

  async 'wait-text'(args) {
    if (args.length < 3) throw new Error('usage: wait-text <id> <substring> <timeout_ms>');
    const id = args[0];
    const timeout = ms(args[args.length - 1]);
    const sub = oneLine(args.slice(1, -1).join(' '));
    try {
      await page.waitForFunction(
        ({ id, sub }) => Array.from(document.querySelectorAll('[data-testid]'))
          .some((el) => el.dataset.testid === id && el.textContent.replace(/\s+/g, ' ').includes(sub)),
        { id, sub },
        { timeout, polling: 100 },
      );
    } catch (e) {
      // Say what was there instead: makes a failing test self-explanatory.
      const seen = await page.evaluate((id) => {
        const el = Array.from(document.querySelectorAll('[data-testid]')).find((x) => x.dataset.testid === id);
        return el ? el.textContent : null;
      }, id).catch(() => null);
      throw new Error(`${why(e)}; text was ${seen === null ? '(absent)' : JSON.stringify(oneLine(seen))}`);
    }
    return 'ok';
  },

  async theme([scheme, t]) {
    if (scheme !== 'light' && scheme !== 'dark') throw new Error('usage: theme <light|dark> [timeout_ms]');
    const timeout = t === undefined ? 15_000 : ms(t);
    const before = await updatedCount();
    // Drop a saved toggle choice first so the media change alone decides.
    await page.evaluate((key) => localStorage.removeItem(key), THEME_KEY);
    await page.emulateMedia({ colorScheme: scheme });
    await page.waitForFunction((n) => Number(document.body.dataset.updated || 0) > n, before, {
      timeout,
      polling: 100,
    });
    const got = await page.evaluate(() => document.documentElement.dataset.theme);
    if (got !== scheme) throw new Error(`page theme is ${got}, wanted ${scheme}`);
    return 'ok';
  },

  async screenshot(_args, rest) {
    const file = rest; // the rest of the line: a path may contain spaces
    if (!file) throw new Error('usage: screenshot <path>');
    await page.screenshot({ path: file, fullPage: true });
    return 'ok';
  },

  async 'console-errors'() {
    for (const e of errors) process.stderr.write(`driver: ${e}\n`);
    return `ok ${errors.length}`;
  },
};

async function shutdown(code) {
  await browser?.close().catch(() => {});
  process.exit(code);
}

try {
  await start();
} catch (e) {
  say(`fail page not ready (needs one render within ${READY_TIMEOUT_MS / 1000} s): ${why(e)}`);
  if (errors.length) process.stderr.write(errors.map((x) => `driver: ${x}\n`).join(''));
  await shutdown(1);
}
say('ready');

// for-await handles one command at a time, so answers stay in order.
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const raw of rl) {
  const line = raw.trim();
  if (!line) continue;
  const [cmd, ...args] = line.split(/\s+/);
  if (cmd === 'quit') {
    say('ok');
    await shutdown(0);
  }
  const h = Object.hasOwn(handlers, cmd) ? handlers[cmd] : null;
  if (!h) {
    say(`fail unknown command: ${cmd}`);
    continue;
  }
  try {
    say(await h(args, line.slice(cmd.length).trim()));
  } catch (e) {
    say(`fail ${why(e)}`);
  }
}
await shutdown(0);
