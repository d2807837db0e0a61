"""The shared column vocabulary of training and serving.

Training tables are pandas DataFrames with these column names; the artifact and the Feature
Store schema use the same names so one feature means one thing everywhere.
"""

from typing import Final

# Interaction table.
USER_ID: Final = "user_id"
ITEM_ID: Final = "item_id"
RATING: Final = "rating"
TIMESTAMP: Final = "timestamp"  # integer seconds since the epoch

INTERACTION_COLUMNS: Final = (USER_ID, ITEM_ID, RATING, TIMESTAMP)

# Item metadata table (item_id plus any of these; missing values are NaN).
CATEGORY: Final = "category"  # a single string label per item
PRICE: Final = "price"  # float, NaN when unknown
YEAR: Final = "year"  # release year, float, NaN when unknown
TITLE: Final = "title"

# Ranker features. The order of RANKER_FEATURES in the manifest is authoritative at serving.
MF_SCORE: Final = "mf_score"
USER_MEAN_RATING: Final = "user_mean_rating"
USER_RATING_COUNT: Final = "user_rating_count"
USER_DAYS_SINCE_FIRST: Final = "user_days_since_first"
ITEM_AVG_RATING: Final = "item_avg_rating"
ITEM_RATING_COUNT: Final = "item_rating_count"
ITEM_RECENT_COUNT: Final = "item_rating_count_30d"  # ratings in the 30 days before the query time
ITEM_DAYS_SINCE_FIRST: Final = "item_days_since_first"
ITEM_DAYS_SINCE_LAST: Final = "item_days_since_last"
CATEGORY_CODE: Final = "category_code"
